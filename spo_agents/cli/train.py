"""`spo-agent train` and the commands around it (`estimate-values`, `plot`)."""

from __future__ import annotations

import argparse
import sys


def add_parsers(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="train a policy with SPO on an environment")
    p.add_argument("--env", default=None, help="environment id (default: math-python)")
    p.add_argument("--config", default=None, help="YAML config file (see configs/)")
    p.add_argument("--resume", default=None, metavar="RUN_DIR", help="continue an interrupted run")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. tracker.rho_min=0.9")
    p.set_defaults(func=_train)


def _train(args: argparse.Namespace) -> int:
    print("spo-agent train: training is not available yet in this version.", file=sys.stderr)
    return 3
