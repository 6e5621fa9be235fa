"""`spo-agent eval`: avg@k / pass@k / maj@k of a model on an environment.

    spo-agent eval --env math-python --base-url http://HOST:8000/v1 --model NAME -k 32
    spo-agent eval --env math-python --backend hf --model smollm2-135m -k 4 --limit 20

Sampling defaults follow the paper's evaluation (App. D): temperature 0.6, top-p 0.95, top-k 20
(top-k is sent only to servers that take it). `--out DIR` receives `transcripts.jsonl` and
`results.json`; `--resume` finishes an interrupted run in the same `--out` without redoing
finished samples. One process at a time writes into an `--out` directory: it holds an exclusive
lock on `DIR/.eval.lock` (`fcntl.flock`, released when the process ends), and a second `eval`
into the same directory is refused.

Exit status: 0 when every sample finished; 1 when any sample failed for infrastructure reasons
after the backend's retries (the summary and `results.json`'s `failed_samples` list them; the
metrics cover the samples that finished), or on an error before any sample ran.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import IO

from spo_agents.cli.env_args import HELP as ENV_ARG_HELP

LOCK = ".eval.lock"
#: Tokens per generation call on a server or a GPU, and for a model run in-process on CPU.
MAX_NEW_TOKENS = 1024
CPU_MAX_NEW_TOKENS = 256


def add_parsers(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "eval",
        help="evaluate a model on an environment (avg@k, pass@k, maj@k)",
        description="Evaluate a model (a server's or one run in-process) on an environment's problems: k samples "
        "per problem, avg@k, pass@k and maj@k, with every transcript saved so an interrupted run resumes.",
    )
    p.add_argument("--env", required=True, help="environment id (`spo-agent envs`), or `package.module:EnvClass`")
    p.add_argument(
        "--env-arg",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help=ENV_ARG_HELP,
    )
    p.add_argument(
        "--split",
        default="test",
        help="problem split passed to environments that take `split` (default: test); `all` evaluates every row "
        "of a file or dataset",
    )
    p.add_argument("--limit", type=int, default=None, help="evaluate only the first N problems")
    p.add_argument("-k", type=int, default=1, help="samples per problem (default: 1)")
    p.add_argument(
        "--max-prompt-tokens",
        type=int,
        default=None,
        help="prompts longer than this many tokens are refused (a failed sample) or truncated, per "
        "--prompt-overflow (default: no limit)",
    )
    p.add_argument(
        "--prompt-overflow",
        choices=["refuse", "truncate"],
        default="refuse",
        help="what a prompt over --max-prompt-tokens does: `refuse` (default) or `truncate` (head and tail kept)",
    )
    p.add_argument(
        "--backend", choices=["openai", "hf", "vllm"], default=None, help="default: `openai` with --base-url, else `hf`"
    )
    p.add_argument(
        "--base-url",
        action="append",
        default=None,
        help="OpenAI-compatible endpoint, e.g. http://127.0.0.1:8000/v1; repeat it or separate URLs with commas to "
        "spread the episodes over several servers",
    )
    p.add_argument(
        "--model",
        default=None,
        help="served model name (with --base-url) or a model for --backend hf: a directory, "
        "`smollm2-135m` (default) or `tiny-random`",
    )
    p.add_argument("--tokenizer", default=None, help="tokenizer directory matching the served model (default: --model)")
    p.add_argument(
        "--api-key-env",
        default="OPENAI_API_KEY",
        help="environment variable holding the API key (default: OPENAI_API_KEY; `EMPTY` when unset)",
    )
    p.add_argument(
        "--mode",
        choices=["auto", "tokens", "text"],
        default="auto",
        help="openai backend: probe the server (auto), require token ids, or text only",
    )
    p.add_argument(
        "--request-timeout",
        type=float,
        default=600.0,
        help="seconds a request waits for the next byte of its answer before a retry (default: 600)",
    )
    p.add_argument("--connect-timeout", type=float, default=3.0, help="seconds to open a connection (default: 3)")
    p.add_argument(
        "--probe-timeout",
        type=float,
        default=10.0,
        help="seconds the first (1-token) request waits for an answer before the run stops (default: 10)",
    )
    p.add_argument(
        "--max-retries",
        type=int,
        default=5,
        help="retries of one request on 429, 5xx, timeouts and dropped connections (default: 5)",
    )
    p.add_argument(
        "--backoff",
        type=float,
        default=0.5,
        help="seconds before the first retry, doubling for each next one (default: 0.5)",
    )
    p.add_argument("--max-backoff", type=float, default=10.0, help="longest wait between two retries (default: 10)")
    p.add_argument(
        "--server-wait",
        type=float,
        default=300.0,
        help="seconds requests wait for a server that went down (refuses connections) to come back (default: 300)",
    )
    p.add_argument("--concurrency", type=int, default=8, help="episodes in flight (default: 8)")
    p.add_argument("--temperature", type=float, default=0.6)
    p.add_argument("--top-p", type=float, default=0.95)
    p.add_argument("--top-k", type=int, default=20, help="0 disables")
    p.add_argument(
        "--max-new-tokens",
        type=int,
        default=None,
        help=f"tokens per generation call (default: {MAX_NEW_TOKENS}; {CPU_MAX_NEW_TOKENS} for a model run in-process "
        "on CPU)",
    )
    p.add_argument(
        "--max-episode-tokens", type=int, default=4096, help="tokens per episode after the prompt (default: 4096)"
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--out",
        default=None,
        metavar="DIR",
        help="where transcripts.jsonl and results.json go (default: runs/eval/ENV-TIME)",
    )
    p.add_argument("--resume", action="store_true", help="finish an interrupted run in --out")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=_eval)


def _env_factory(env_id: str, split: str, kwargs: dict):
    """A factory of fresh envs (built by `envs.make`, so transcripts record the registered id), and
    that id. `split` is passed to envs whose constructor takes it."""
    import inspect

    from spo_agents import envs
    from spo_agents.registry import ENVS

    spec, obj = ENVS.load(env_id)
    merged = dict(kwargs)
    params = inspect.signature(obj).parameters
    if "split" in params or any(p.kind is p.VAR_KEYWORD for p in params.values()):
        merged.setdefault("split", split)
    probe = envs.make(env_id, **merged)  # checks the options, and that the env is a text env
    return (lambda: envs.make(env_id, **merged)), probe.env_id, probe


def _eval(args: argparse.Namespace) -> int:
    import logging

    from spo_agents.cli.env_args import parse_env_args
    from spo_agents.errors import ConfigError
    from spo_agents.models import check_model_name
    from spo_agents.serving.endpoint import base_urls

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    urls = base_urls(args.base_url)
    args.base_url = (urls[0] if len(urls) == 1 else urls) or None
    backend = args.backend or ("openai" if args.base_url else "hf")
    if backend == "openai" and not args.base_url:
        raise ConfigError("`--backend openai` needs `--base-url URL` (and `--model NAME`)")
    if backend == "openai" and not args.model:
        raise ConfigError("`--base-url` needs `--model NAME`, the model name the server serves (see its /v1/models)")
    if args.resume and not args.out:
        raise ConfigError("`--resume` needs `--out DIR`, the directory of the run to finish")
    _check_numbers(args)
    check_model_name(args.model or "smollm2-135m")
    env_kwargs = parse_env_args(args.env_arg)
    factory, env_id, probe = _env_factory(args.env, args.split, env_kwargs)
    try:
        problem_ids = list(probe.problem_ids)
        if args.limit is not None:
            problem_ids = problem_ids[: args.limit]
        fingerprint = _fingerprint(probe, problem_ids)
        args.problems_note = problems_note(probe, args.split)
    finally:
        probe.close()
    args.env_kwargs, args.problems_fingerprint = env_kwargs, fingerprint
    args.max_new_tokens = _max_new_tokens(args.max_new_tokens, backend)
    print(f"{env_id}: {len(problem_ids)} problems{args.problems_note}", file=sys.stderr)
    default_out = Path("runs") / "eval" / f"{env_id.replace('/', '_')}-{time.strftime('%Y%m%d-%H%M%S')}"
    out = Path(args.out) if args.out else default_out
    lock = lock_out_dir(out)
    try:
        return _run(args, backend, factory, env_id, problem_ids, out)
    finally:
        lock.close()


def _check_numbers(args: argparse.Namespace) -> None:
    """One clear error for a number out of range, before anything loads."""
    import math

    from spo_agents.errors import ConfigError

    rules = [
        ("-k", args.k, lambda x: x >= 1, "an integer >= 1"),
        ("--limit", args.limit, lambda x: x is None or x >= 1, "an integer >= 1 (leave it out for every problem)"),
        ("--temperature", args.temperature, lambda x: math.isfinite(x) and x >= 0, "a number >= 0 (0 is greedy)"),
        ("--top-p", args.top_p, lambda x: math.isfinite(x) and 0 < x <= 1, "in (0, 1]"),
        ("--top-k", args.top_k, lambda x: x >= 0, "an integer >= 0 (0 turns it off)"),
        ("--max-new-tokens", args.max_new_tokens, lambda x: x is None or x >= 1, "an integer >= 1"),
        ("--max-episode-tokens", args.max_episode_tokens, lambda x: x >= 1, "an integer >= 1"),
        ("--concurrency", args.concurrency, lambda x: x >= 1, "an integer >= 1"),
        ("--max-prompt-tokens", args.max_prompt_tokens, lambda x: x is None or x >= 8, "an integer >= 8"),
    ]
    for flag, value, ok, rule in rules:
        if not ok(value):
            raise ConfigError(f"`{flag}` must be {rule}, got {value}")


def default_max_new_tokens(backend: str, cuda: bool) -> int:
    """Tokens per generation call when `--max-new-tokens` is not given: a CPU-sized budget for a
    model that runs in-process without a GPU (the `hf` backend on CPU), else `MAX_NEW_TOKENS`."""
    return CPU_MAX_NEW_TOKENS if backend == "hf" and not cuda else MAX_NEW_TOKENS


def _max_new_tokens(given: int | None, backend: str) -> int:
    if given is not None:
        return given
    cuda = False
    if backend == "hf":
        import torch

        cuda = torch.cuda.is_available()
    n = default_max_new_tokens(backend, cuda)
    if n == CPU_MAX_NEW_TOKENS:
        print(
            f"--max-new-tokens {n}: the default for a model run on CPU ({MAX_NEW_TOKENS} on a GPU or a server); "
            "pass --max-new-tokens N for longer answers",
            file=sys.stderr,
        )
    return n


def problems_note(env, split: str) -> str:
    """What the problems are out of: rows read and set aside, for a set loaded from rows (a file
    or dataset); empty for generated sets and for envs without a `ProblemSet`."""
    from spo_agents.envs.base import MultiTurnEnv

    problem_set = env.unwrapped.problem_set if isinstance(env.unwrapped, MultiTurnEnv) else None
    if problem_set is None or not problem_set.source.startswith(("file:", "hf:")):
        return ""
    report = problem_set.report
    aside = []
    if report.other_split:
        aside.append(f"{report.other_split} hash into the other split")
    if report.duplicates:
        aside.append(f"{report.duplicates} repeat earlier content")
    if report.skipped_bad:
        aside.append(f"{report.skipped_bad} bad rows skipped")
    text = f" (split `{split}` of {report.rows} rows read"
    text += f"; set aside: {', '.join(aside)}" if aside else ""
    if report.other_split:
        text += "; `--split all` evaluates every row"
    return text + ")"


def _fingerprint(env, problem_ids: list[str]) -> str:
    """The problems' fingerprint (ids and prompts) of a `MultiTurnEnv`; ids alone for other envs."""
    from spo_agents.envs.base import MultiTurnEnv
    from spo_agents.evaluation.runner import problems_fingerprint
    from spo_agents.types import Problem

    if isinstance(env, MultiTurnEnv):
        by_id = {p.id: p for p in env.problems}
        return problems_fingerprint([by_id[i] for i in problem_ids])
    return problems_fingerprint([Problem(i, "") for i in problem_ids])


def _run(args: argparse.Namespace, backend: str, factory, env_id: str, problem_ids: list[str], out: Path) -> int:
    """Evaluate into `out` (locked by the caller) and print the summary; the exit status."""
    import asyncio

    from spo_agents.errors import ConfigError
    from spo_agents.evaluation.runner import TRANSCRIPTS, evaluate
    from spo_agents.rollout.policy import make_policy
    from spo_agents.rollout.policy.base import SamplingParams
    from spo_agents.serving.endpoint import base_urls

    transcripts = out / TRANSCRIPTS
    if not args.resume and transcripts.is_file() and transcripts.stat().st_size:
        raise ConfigError(
            f"`{out}` already holds the transcripts of an evaluation: finish it with `--resume`, or choose another "
            f"`--out` (or delete it)"
        )
    if args.resume and transcripts.is_file():
        from spo_agents.types import read_jsonl

        for _ in read_jsonl(transcripts):  # a damaged file is one error line, before the model loads
            pass
    model = args.model or "smollm2-135m"
    if backend == "openai":
        policy = make_policy(
            "openai",
            model,
            base_url=args.base_url,
            tokenizer=args.tokenizer,
            api_key_env=args.api_key_env,
            mode=args.mode,
            request_timeout_s=args.request_timeout,
            connect_timeout_s=args.connect_timeout,
            probe_timeout_s=args.probe_timeout,
            max_retries=args.max_retries,
            backoff_s=args.backoff,
            max_backoff_s=args.max_backoff,
            server_wait_s=args.server_wait,
            max_concurrency=max(args.concurrency, 1),
        )
        print(
            f"connecting to {', '.join(base_urls(args.base_url))} (model `{model}`): a 1-token request, waiting up to "
            f"{args.probe_timeout:g} s for its answer",
            file=sys.stderr,
        )
    else:
        policy = make_policy(backend, model)
    sampling = SamplingParams(
        temperature=args.temperature, top_p=args.top_p, top_k=args.top_k, max_new_tokens=args.max_new_tokens
    )
    settings = {
        "env": env_id,
        "split": args.split,
        "backend": backend,
        "model": model,
        "base_url": args.base_url,
        "env_kwargs": args.env_kwargs,
        "problems": args.problems_fingerprint,
    }

    prompt_limit = None
    if args.max_prompt_tokens is not None:
        from spo_agents.rollout.prompt_limit import PromptLimit

        prompt_limit = PromptLimit(args.max_prompt_tokens, args.prompt_overflow)

    async def run():
        try:
            return await evaluate(
                factory,
                policy,
                problem_ids,
                k=args.k,
                sampling=sampling,
                concurrency=args.concurrency,
                out_dir=out,
                resume=args.resume,
                progress=not args.no_progress,
                max_episode_tokens=args.max_episode_tokens,
                seed=args.seed,
                settings=settings,
                prompt_limit=prompt_limit,
            )
        finally:
            await policy.close()

    report = asyncio.run(run())
    note = args.problems_note
    print(f"{env_id}: {report.num_problems} problems{note} x k={report.k} ({backend}: {model})")
    print(report.summary_table())
    if backend == "openai":
        print(f"server: {policy.stats.summary()}")
    print(f"results: {out / 'results.json'}\ntranscripts: {transcripts}")
    failed = report.failed_samples
    if failed:
        print(
            f"{len(failed)} of {report.num_problems * report.k} samples failed for infrastructure reasons after "
            f"retries and are left out of the metrics, which cover the {report.num_samples} that finished "
            f"(`failed_samples` in results.json; first: {failed[0]['error']}); `--resume --out {out}` redoes them",
            file=sys.stderr,
        )
        return 1
    return 0


def lock_out_dir(out: Path) -> IO[str]:
    """Take the exclusive lock of an eval output directory for this process, or raise
    `ConfigError` when another process holds it. Close the returned file to release it (the
    lock also ends with the process, however it ends)."""
    import fcntl

    from spo_agents.errors import ConfigError

    try:
        out.mkdir(parents=True, exist_ok=True)
        f = open(out / LOCK, "a+", encoding="utf-8")  # noqa: SIM115 - the open file is the lock
    except OSError as e:
        why = "it is a file" if out.exists() and not out.is_dir() else (e.strerror or type(e).__name__)
        msg = f"cannot write the evaluation into `{out}` ({why}); pass `--out` a writable directory"
        raise ConfigError(msg) from None
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        f.seek(0)
        holder = f.read().strip() or "a process"
        f.close()
        raise ConfigError(
            f"another `spo-agent eval` ({holder}) is writing into `{out}`: two runs would interleave their "
            f"transcripts. Wait for it to finish (then `--resume` if needed), or evaluate into another `--out`"
        ) from None
    f.truncate(0)
    f.write(f"pid {os.getpid()}\n")
    f.flush()
    return f
