"""`spo-agent envs` commands.

`spo-agent envs` lists every registered environment id (built-ins and entry-point plugins) with
its one-line description; `--json` prints the same as JSON for scripts.
"""

from __future__ import annotations

import argparse
import json


def _run_envs(args: argparse.Namespace) -> int:
    from spo_agents.registry import ENVS, describe

    specs = ENVS.list()
    rows = [{"id": s.id, "description": describe(s), "source": s.source} for s in specs]
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    if not rows:
        print("no environments registered")
        return 0
    width = max(len(r["id"]) for r in rows)
    for r in rows:
        source = "" if r["source"] == "built-in" else f"  [{r['source']}]"
        print(f"{r['id']:<{width}}  {r['description']}{source}")
    print("\nAn id without its version (`math-python`) means the latest version.")
    return 0


def _add_envs_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("envs", help="list the registered environments", description=__doc__.splitlines()[2])
    p.add_argument("--json", action="store_true", help="print the list as JSON")
    p.set_defaults(func=_run_envs)


def add_parsers(sub: argparse._SubParsersAction) -> None:
    _add_envs_parser(sub)
