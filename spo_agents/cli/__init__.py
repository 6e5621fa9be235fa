"""`spo-agent`: the command line. It parses arguments, builds the config and calls the library.

Each command group lives in its own module with an `add_parsers(subparsers)` function that
registers its sub-commands and sets `func` (called with the parsed arguments, returns an exit
code). Modules import heavy dependencies only inside `func`, so `spo-agent --help` is fast.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from spo_agents import __version__
from spo_agents.errors import SPOError

# Modules under spo_agents.cli that contribute sub-commands, in help order.
COMMAND_MODULES = ["train", "eval", "serve", "envs", "sandbox", "view", "rescore"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="spo-agent",
        description="Train and evaluate LLM agents with Single-stream Policy Optimization (SPO).",
    )
    parser.add_argument("--version", action="version", version=f"spo-agents {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(f"spo_agents.cli.{name}").add_parsers(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except SPOError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
