"""`spo-agent rescore`: re-apply the environment's current answer checking to saved episodes.

    spo-agent rescore runs/eval/run1                  # an eval dir: writes results.rescored.json
    spo-agent rescore runs/math-python-v0-spo-...     # a run: training trajectories and eval dirs

Nothing is regenerated and nothing is overwritten (`spo_agents.evaluation.rescore`).
"""

from __future__ import annotations

import argparse


def add_parsers(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "rescore",
        help="re-score saved transcripts or training trajectories with the env's current checker",
        description="Re-apply the environment's current reward and answer checking to the saved text of an eval "
        "dir's transcripts or a run's saved training trajectories (and its eval dirs), without regenerating. "
        "Results go next to the old ones (results.rescored.json, trajectories/rescored.json); the samples "
        "that flipped are printed with both answers and the reason.",
    )
    p.add_argument("path", metavar="RUN_DIR|EVAL_DIR")
    p.add_argument("--env", default=None, help="env to re-score with (default: the latest version of the saved one)")
    p.add_argument(
        "--env-arg",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="environment option the episodes were made with (YAML value); repeatable",
    )
    p.add_argument("--split", default=None, help="problem split of an eval dir (default: the saved one, else `test`)")
    p.set_defaults(func=_rescore)


def _rescore(args: argparse.Namespace) -> int:
    from spo_agents.cli.env_args import parse_env_args
    from spo_agents.evaluation.rescore import rescore_path

    kwargs = parse_env_args(args.env_arg)
    reports = rescore_path(args.path, env_id=args.env, env_kwargs=kwargs, split=args.split)
    for r in reports:
        print(r.render())
    return 0
