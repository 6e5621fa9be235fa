"""`spo-agent train` and the commands around it (`estimate-values`, `plot`)."""

from __future__ import annotations

import argparse
import os

from spo_agents.cli.env_args import env_arg_overrides

_ENV_ARG_HELP = "environment option, repeatable (sets `env.kwargs.KEY`), e.g. --env-arg source=procedural:arith-mul"


def add_parsers(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "train",
        help="train a policy with SPO on an environment",
        description="Train with SPO (or the GRPO comparison). Defaults: the embedded CPU run "
        "(SmolLM2-135M-Instruct, local sandbox). Metrics, checkpoints and the config go to "
        "`train.output_dir/<run name>`; `--resume RUN_DIR` continues an interrupted run.",
    )
    p.add_argument("--env", default=None, help="environment id (default: math-python)")
    p.add_argument("--env-arg", action="append", default=[], metavar="KEY=VALUE", help=_ENV_ARG_HELP)
    p.add_argument("--config", default=None, help="YAML config file (see configs/)")
    p.add_argument("--model", default=None, help="model name or directory (sets `model.name`)")
    p.add_argument("--steps", type=int, default=None, help="learner steps (sets `train.steps`)")
    p.add_argument(
        "--rollout",
        default=None,
        choices=["hf", "vllm", "openai", "vllm-server"],
        help="rollout backend (sets `rollout.backend`); `vllm-server` starts a vLLM server unless --base-url is given",
    )
    p.add_argument(
        "--base-url",
        action="append",
        default=None,
        help="OpenAI-compatible endpoint of a running server (sets `rollout.base_url`); repeat it or separate "
        "URLs with commas for several servers",
    )
    p.add_argument(
        "--resume",
        default=None,
        metavar="RUN_DIR",
        help="continue an interrupted run (its saved config, plus overrides)",
    )
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. tracker.rho_min=0.9 train.batch_size=16")
    p.set_defaults(func=_train)

    e = sub.add_parser(
        "estimate-values",
        help="offline value estimation: n samples per training problem, for `tracker.init_values`",
        description="Sample N episodes of every training problem with the initial policy and the "
        "training sampling settings; write problem id -> (reward sum, samples) for `tracker.init_values` "
        "(docs/algorithm.md section 1).",
    )
    e.add_argument("--env", default=None, help="environment id (default: the config's)")
    e.add_argument("--env-arg", action="append", default=[], metavar="KEY=VALUE", help=_ENV_ARG_HELP)
    e.add_argument("--model", default=None, help="model name or directory (default: the config's)")
    e.add_argument("-n", type=int, default=8, help="samples per problem (paper: 8)")
    e.add_argument("--config", default=None, help="YAML config file (sampling and env settings)")
    e.add_argument("--out", default="values.json", help="values file to write (default: values.json)")
    e.add_argument("--limit", type=int, default=None, help="only the first N problems of the split")
    e.add_argument("overrides", nargs="*", help="dotted overrides, e.g. rollout.temperature=1.0")
    e.set_defaults(func=_estimate_values)

    pl = sub.add_parser(
        "plot",
        help="write PNG curves of a run's metrics",
        description="Write one PNG per metric group to RUN_DIR/plots/.",
    )
    pl.add_argument("run_dir", metavar="RUN_DIR")
    pl.add_argument("--out", default=None, help="output directory (default: RUN_DIR/plots)")
    pl.set_defaults(func=_plot)


def _config(args: argparse.Namespace):
    from spo_agents.config import load_config

    overrides = env_arg_overrides(getattr(args, "env_arg", [])) + list(args.overrides)
    if getattr(args, "env", None):
        overrides.insert(0, f"env.id={args.env}")
    if getattr(args, "model", None):
        overrides.insert(0, f"model.name={args.model}")
    if getattr(args, "steps", None) is not None:
        overrides.insert(0, f"train.steps={args.steps}")
    if getattr(args, "rollout", None):
        overrides.insert(0, f"rollout.backend={args.rollout}")
    if getattr(args, "base_url", None):
        overrides.insert(0, _base_url_override(args.base_url))
    return load_config(args.config, overrides)


def _base_url_override(values: list[str]) -> str:
    """`rollout.base_url=` one URL, or a list of them (JSON is a YAML flow list)."""
    import json

    from spo_agents.serving.endpoint import base_urls

    urls = base_urls(values)
    return f"rollout.base_url={urls[0] if len(urls) == 1 else json.dumps(urls)}"


def _train(args: argparse.Namespace) -> int:
    import logging

    from spo_agents.errors import ConfigError
    from spo_agents.training.run import load_run_config, train

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.resume:
        if args.config:
            raise ConfigError(
                "`--resume` uses the run's saved `config.yaml`; drop `--config` (dotted overrides still apply)"
            )
        overrides = list(args.overrides)
        if args.steps is not None:
            overrides.append(f"train.steps={args.steps}")
        if args.rollout:
            overrides.append(f"rollout.backend={args.rollout}")
        if args.base_url:
            overrides.append(_base_url_override(args.base_url))
        if args.env or args.model or args.env_arg:
            raise ConfigError(
                "`--env`, `--env-arg` and `--model` cannot change on `--resume`; "
                "the checkpoint belongs to the saved ones"
            )
        cfg = load_run_config(args.resume, overrides)
        run_dir = args.resume
    else:
        cfg = _config(args)
        run_dir = None  # `train` names it (the same on every rank of a distributed run)
    res = train(cfg, run_dir=run_dir, resume=bool(args.resume))
    if int(os.environ.get("RANK", "0")) != 0:  # the other ranks of a multi-process learner: rank 0 reports
        return 0
    evals = ", ".join(f"step {s}: {v:.3f}" for s, v in res.eval_history)
    stopped = " (stopped at train.max_minutes)" if res.stopped_early else ""
    print(f"finished at step {res.step}{stopped}; run directory: {res.run_dir}")
    if evals:
        print(f"held-out avg@{cfg.eval.k}: {evals}")
    return 0


def _estimate_values(args: argparse.Namespace) -> int:
    from spo_agents.training.values import estimate_values

    cfg = _config(args)
    counts = estimate_values(cfg, n=args.n, out=args.out, limit=args.limit)
    total_s = sum(s for s, _ in counts.values())
    total_n = sum(n for _, n in counts.values())
    print(
        f"wrote {args.out}: {len(counts)} problems, {total_s}/{total_n} successful samples; "
        f"use it with `tracker.init_values={args.out}`"
    )
    return 0


def _plot(args: argparse.Namespace) -> int:
    from spo_agents.training.plot import plot_run

    for path in plot_run(args.run_dir, args.out):
        print(path)
    return 0
