"""Evaluation: k episodes per problem, avg@k / pass@k / maj@k (paper App. D, docs/algorithm.md section 6).

The same episodes as training (`spo_agents.rollout.episode.run_episode`), so a model is evaluated exactly
as it acts. Used by `spo-agent eval` and by the trainer's periodic held-out evaluation.

Files written to `out_dir` (when given):
- `transcripts.jsonl`: one `Trajectory` per finished sample (`spo_agents.types.write_jsonl`),
  with `group_id = problem_id`, `sample_index` in 0..k-1 and the decoded completion in
  `info["completion"]`. Appended as samples finish, so an interrupted run loses nothing.
- `results.json`: the report (`EvalReport.to_dict()`), written at the end.

`resume=True` reads `transcripts.jsonl` and runs only the samples that are missing or ended in an
infrastructure error; the last record of a sample wins. It refuses other settings than
`settings.json` records (sampling, budgets, k, the env with its options and the problems'
fingerprint), except a moved server (`base_url`), which is a notice. An environment that raises
stops the evaluation with a `PluginError` (the finished samples stay in the transcripts). Samples
with an infrastructure error (`Trajectory.error`) are not evidence about the policy: they are
counted in `errors`, listed in `failed_samples` and left out of the metrics; a problem with fewer
than j valid samples is left out of pass@j (`EvalReport.incomplete`).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import hashlib
import json
import logging
import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from spo_agents.algorithm.passk import ks_up_to, majority_correct, pass_at_k
from spo_agents.envs.protocol import TextEnv
from spo_agents.errors import ConfigError, PluginError, SPOError
from spo_agents.files import repair_torn_tail
from spo_agents.rollout.episode import derive_seed, run_episode
from spo_agents.rollout.policy.base import PolicyBackend, SamplingParams
from spo_agents.rollout.prompt_limit import PromptLimit
from spo_agents.types import Trajectory, read_jsonl, write_jsonl

log = logging.getLogger(__name__)

TRANSCRIPTS = "transcripts.jsonl"
RESULTS = "results.json"
SETTINGS = "settings.json"  # how the samples were drawn; `resume` must match it


@dataclass
class ProblemResult:
    """Metrics of one problem over its valid samples."""

    problem_id: str
    n: int  # valid samples (no infrastructure error)
    correct: int
    errors: int
    answers: list[Any]
    avg: float
    pass_at_k: dict[int, float]
    maj: float
    reward_sum: float = 0.0  # sum of the valid samples' rewards (offline value estimation)


@dataclass
class EvalReport:
    """Overall metrics (means over problems) and per-problem records."""

    k: int
    avg_at_k: float
    pass_at_k: dict[int, float]
    maj_at_k: float
    num_problems: int
    num_samples: int
    errors: int
    incomplete: dict[int, int]  # j -> problems with fewer than j valid samples (left out of pass@j)
    token_io: bool
    problems: list[ProblemResult] = field(default_factory=list)
    settings: dict[str, Any] = field(default_factory=dict)
    # samples that ended in an infrastructure error (after the backend's retries), left out of the
    # metrics: {"problem_id", "sample_index", "error"} each; `--resume` redoes them
    failed_samples: list[dict[str, Any]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["pass_at_k"] = {str(j): v for j, v in self.pass_at_k.items()}
        d["incomplete"] = {str(j): v for j, v in self.incomplete.items()}
        for p in d["problems"]:
            p["pass_at_k"] = {str(j): v for j, v in p["pass_at_k"].items()}
        return d

    def summary_table(self) -> str:
        rows = [
            ("problems", str(self.num_problems)),
            ("samples", str(self.num_samples)),
            ("infra errors", str(self.errors)),
        ]
        rows.append((f"avg@{self.k}", f"{self.avg_at_k:.4f}"))
        rows += [(f"pass@{j}", f"{v:.4f}") for j, v in self.pass_at_k.items()]
        rows.append((f"maj@{self.k}", f"{self.maj_at_k:.4f}"))
        if not self.token_io:
            rows.append(("token io", "no (text-only server: evaluation only)"))
        w = max(len(r[0]) for r in rows)
        return "\n".join(f"{a:<{w}}  {b}" for a, b in rows)


def sample_seed(problem_id: str, sample_index: int, base: int = 0) -> int:
    """A stable per-sample seed (same sample, same seed, on every run and resume)."""
    return derive_seed(base, problem_id, sample_index)


def compute_report(
    samples: dict[tuple[str, int], Trajectory],
    problem_ids: list[str],
    k: int,
    equivalent: Callable[[Any, Any], bool],
    settings: dict[str, Any] | None = None,
) -> EvalReport:
    """Metrics from finished samples keyed by (problem id, sample index)."""
    ks = ks_up_to(k)
    results: list[ProblemResult] = []
    errors = 0
    token_io = True
    for pid in problem_ids:
        trajs = [samples[(pid, i)] for i in range(k) if (pid, i) in samples]
        valid = [t for t in trajs if t.error is None]
        errors += len(trajs) - len(valid)
        token_io = token_io and all(t.info.get("token_io", True) for t in valid)
        correct = [t.correct for t in valid]
        # an episode cut off by a budget never gave its final answer: it does not vote
        answers = [None if t.truncated else t.info.get("answer") for t in valid]
        n, c = len(valid), sum(correct)
        results.append(
            ProblemResult(
                problem_id=pid,
                n=n,
                correct=c,
                errors=len(trajs) - len(valid),
                answers=answers,
                avg=c / n if n else 0.0,
                pass_at_k={j: pass_at_k(n, c, j) for j in ks if n >= j},
                maj=majority_correct(answers, correct, equivalent),
                reward_sum=float(sum(t.reward for t in valid)),
            )
        )
    scored = [r for r in results if r.n > 0]

    def mean(xs: list[float]) -> float:
        return sum(xs) / len(xs) if xs else 0.0

    return EvalReport(
        k=k,
        avg_at_k=mean([r.avg for r in scored]),
        pass_at_k={j: mean([r.pass_at_k[j] for r in scored if j in r.pass_at_k]) for j in ks},
        maj_at_k=mean([r.maj for r in scored]),
        num_problems=len(problem_ids),
        num_samples=sum(r.n for r in results),
        errors=errors,
        incomplete={j: sum(1 for r in results if j not in r.pass_at_k) for j in ks},
        token_io=token_io,
        problems=results,
        settings=dict(settings or {}),
    )


async def evaluate(
    env_factory: Callable[[], TextEnv],
    policy: PolicyBackend,
    problem_ids: list[str],
    *,
    k: int = 1,
    sampling: SamplingParams | None = None,
    concurrency: int = 8,
    out_dir: str | Path | None = None,
    resume: bool = False,
    progress: bool = True,
    max_episode_tokens: int = 1024,
    seed: int = 0,
    settings: dict[str, Any] | None = None,
    prompt_limit: PromptLimit | None = None,
) -> EvalReport:
    """Run `k` episodes of every problem and report avg@k, pass@k and maj@k (module docstring).

    Paper eval sampling (App. D): `SamplingParams(temperature=0.6, top_p=0.95, top_k=20)`.
    `prompt_limit` refuses (a failed sample) or truncates prompts over a token limit.
    """
    if k < 1:
        raise ValueError(f"`k` must be >= 1, got {k}")
    sampling = sampling or SamplingParams(temperature=0.6, top_p=0.95, top_k=20)
    out = Path(out_dir) if out_dir is not None else None
    samples: dict[tuple[str, int], Trajectory] = {}
    info = {
        "sampling": asdict(sampling),
        "max_episode_tokens": max_episode_tokens,
        **({"prompt_limit": asdict(prompt_limit)} if prompt_limit is not None else {}),
        "seed": seed,
        "k": k,
        **(settings or {}),
    }
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        path = out / TRANSCRIPTS
        saved_info = json.dumps(info, indent=2, ensure_ascii=False, default=str) + "\n"
        if resume and path.is_file():
            _check_same_settings(out / SETTINGS, json.loads(saved_info))
            for t in read_jsonl(path):
                samples[(t.problem_id, t.sample_index)] = t
            repair_torn_tail(path)
        elif path.exists():
            path.unlink()
        (out / SETTINGS).write_text(saved_info, encoding="utf-8")
    await policy.connect()  # fail fast, before any episode, when a server is unreachable
    wanted = set(problem_ids)
    samples = {key: t for key, t in samples.items() if key[0] in wanted and key[1] < k}
    todo = [
        (pid, i)
        for pid in problem_ids
        for i in range(k)
        if (pid, i) not in samples or samples[(pid, i)].error is not None
    ]
    envs: list[Any] = []
    limit = asyncio.Semaphore(max(1, concurrency))
    executor = concurrent.futures.ThreadPoolExecutor(max_workers=max(1, concurrency), thread_name_prefix="eval-env")
    bar = _progress(len(todo), progress)
    tally = {"done": 0, "correct": 0}
    write_lock = asyncio.Lock()

    async def one(pid: str, i: int) -> None:
        async with limit:
            env = envs.pop() if envs else env_factory()
            try:
                t = await run_episode(
                    env,
                    policy,
                    pid,
                    sampling=sampling,
                    max_episode_tokens=max_episode_tokens,
                    seed=sample_seed(pid, i, seed),
                    executor=executor,
                    prompt_limit=prompt_limit,
                )
            except SPOError:
                raise  # a config error: the run stops (infrastructure errors are in `t.error`)
            except Exception as e:  # an environment's own exception is a plugin bug, never data
                raise PluginError.from_exception(env, e) from e
            finally:
                envs.append(env)
        t.group_id, t.sample_index = pid, i
        t.info["completion"] = policy.tokenizer.decode(t.token_ids, skip_special_tokens=False)
        samples[(pid, i)] = t
        if out is not None:
            async with write_lock:
                write_jsonl(out / TRANSCRIPTS, [t], append=True)
        tally["done"] += 1
        tally["correct"] += int(t.error is None and t.correct)
        if bar is not None:
            bar.update(1)
            bar.set_postfix(
                acc=f"{tally['correct'] / tally['done']:.3f}", errors=sum(1 for s in samples.values() if s.error)
            )

    tasks = [asyncio.ensure_future(one(pid, i)) for pid, i in todo]
    try:
        await asyncio.gather(*tasks)
    except BaseException:
        for task in tasks:  # the finished samples are in the transcripts; stop the rest
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        raise
    finally:
        if bar is not None:
            bar.close()
        executor.shutdown(wait=False, cancel_futures=True)
        if not envs:
            envs.append(env_factory())
        equivalent = envs[0].answers_equivalent
        for env in envs:
            try:
                env.close()
            except Exception:  # noqa: BLE001 - closing is best effort
                log.warning("closing an environment failed", exc_info=True)
    report = compute_report(samples, problem_ids, k, equivalent, info)
    report.failed_samples = [
        {"problem_id": pid, "sample_index": i, "error": samples[(pid, i)].error}
        for pid in problem_ids
        for i in range(k)
        if (pid, i) in samples and samples[(pid, i)].error is not None
    ]
    if not policy.supports_token_io:
        report.token_io = False
    if out is not None:
        (out / RESULTS).write_text(json.dumps(report.to_dict(), indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return report


def problems_fingerprint(problems: list[Any]) -> str:
    """SHA-256 over the problems' ids and prompts, in order: another data file, split or limit
    gives another fingerprint even where ids overlap."""
    h = hashlib.sha256()
    for p in problems:
        h.update(json.dumps([p.id, p.prompt], ensure_ascii=False).encode("utf-8"))
    return h.hexdigest()


#: settings a resume may change (the server moved but serves the same model): a notice only
MOVABLE = ("base_url",)


def _check_same_settings(path: Path, now: dict[str, Any]) -> None:
    """`resume` may only add samples drawn the same way: compare `now` (as JSON reads back) with
    the run's saved settings (the env and its options, the problems, k, sampling, budgets)."""
    if not path.is_file():
        return  # written by a version that did not save them
    saved = json.loads(path.read_text(encoding="utf-8"))
    keys = sorted(set(saved) | set(now))
    for key in MOVABLE:
        if saved.get(key) != now.get(key):
            print(f"notice: resuming with `{key}` {now.get(key)!r} (the run used {saved.get(key)!r})", file=sys.stderr)
    diffs = [
        f"`{key}`: {saved.get(key)!r} then, {now.get(key)!r} now"
        for key in keys
        if key not in MOVABLE and saved.get(key) != now.get(key)
    ]
    if diffs:
        raise ConfigError(
            f"`--resume` in `{path.parent}` with other settings than the run it continues: "
            + "; ".join(diffs)
            + ". Resume with the same settings, or evaluate into a new `--out` directory"
        )


def _progress(total: int, enabled: bool) -> Any:
    if not enabled or total == 0:
        return None
    from tqdm import tqdm

    return tqdm(total=total, desc="eval", unit="sample", file=sys.stderr, dynamic_ncols=True)
