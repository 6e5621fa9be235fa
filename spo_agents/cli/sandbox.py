"""`spo-agent sandbox` commands: run code as the agent would, list backends.

    spo-agent sandbox run [--backend local] [--timeout S] [--stateless] [--pretty] FILE|-
    spo-agent sandbox list

`run` prints the `SandboxResult` as JSON (one object per call; `--pretty` prints it readably).
`--repeat N` runs the same code N times in one session, which shows state persisting (or not,
with `--stateless`). `-o key=value` passes a backend option (`-o isolation=none`).
"""

from __future__ import annotations

import argparse
import sys


def add_parsers(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "sandbox",
        help="run code in a sandbox backend, list backends",
        description="Run Python code in a sandbox backend the way the environments' tools do, or list the "
        "registered backends and whether they can run here.",
    )
    ssub = p.add_subparsers(dest="sandbox_command", metavar="SUBCOMMAND")

    run = ssub.add_parser(
        "run",
        help="run a Python file (or - for stdin) in a sandbox session and print the result as JSON",
        description="Run a Python file (or stdin) in one sandbox session and print what the call returned: "
        "stdout, stderr, the exit status, the time taken and any limit that was hit.",
    )
    run.add_argument("file", help="Python source file, or - to read stdin")
    run.add_argument(
        "--backend", default="local", help="sandbox backend (default: local; see `spo-agent sandbox list`)"
    )
    run.add_argument(
        "--timeout", type=float, default=None, help="wall-clock seconds per call (default: the backend's, 10)"
    )
    run.add_argument("--stateless", action="store_true", help="a fresh interpreter for every call")
    run.add_argument("--repeat", type=int, default=1, help="run the code this many times in the same session")
    run.add_argument("--pretty", action="store_true", help="print a readable summary instead of JSON")
    run.add_argument(
        "-o",
        "--option",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="backend option, e.g. isolation=none, memory_mb=512 (repeatable)",
    )
    run.set_defaults(func=_run)

    lst = ssub.add_parser(
        "list",
        help="show the registered backends, whether they are available and their isolation",
        description="Show every registered sandbox backend, whether it can run on this machine (and why not), "
        "and the isolation it gives.",
    )
    lst.add_argument("--json", action="store_true", help="print JSON")
    lst.set_defaults(func=_list)

    p.set_defaults(func=lambda args: (p.print_help(), 2)[1])


def _parse_options(items: list[str]) -> dict:
    import json

    from spo_agents.errors import ConfigError

    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"backend option `{item}` must look like `key=value` (e.g. `-o memory_mb=512`)")
        try:
            out[key] = json.loads(value)
        except ValueError:
            out[key] = value
    return out


def _read_code(path: str) -> str:
    from spo_agents.errors import ConfigError

    name = "stdin" if path == "-" else f"the code file `{path}`"
    try:
        if path == "-" and not hasattr(sys.stdin, "buffer"):
            return sys.stdin.read()  # a stream that is text already (an embedding program's)
        if path == "-":
            data = sys.stdin.buffer.read()
        else:
            with open(path, "rb") as f:
                data = f.read()
    except OSError as e:
        raise ConfigError(f"cannot read {name}: {e.strerror}; pass a readable .py file or `-` for stdin") from e
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(
            f"{name} is not UTF-8 text (byte 0x{data[e.start]:02x} at offset {e.start}); "
            "save it as UTF-8 (Python's own source encoding)"
        ) from e


def _check_numbers(args: argparse.Namespace) -> None:
    import math

    from spo_agents.errors import ConfigError

    if args.timeout is not None and not (math.isfinite(args.timeout) and args.timeout > 0):
        raise ConfigError(
            f"`--timeout` must be a number of seconds > 0, got {args.timeout:g}; e.g. `--timeout 5`, "
            "or leave it out for the backend's default (10)"
        )
    if args.repeat < 1:
        raise ConfigError(f"`--repeat` must be >= 1, got {args.repeat}; e.g. `--repeat 3`")


def _pretty(result, index: int, total: int) -> str:
    flags = [k for k in ("timed_out", "memory_exceeded", "output_truncated", "session_restarted") if getattr(result, k)]
    head = f"--- call {index + 1}/{total}: exit {result.exit_status}, {result.duration_s * 1000:.1f} ms"
    head += f", {' '.join(flags)}" if flags else ""
    parts = [head]
    if result.stdout:
        parts += ["[stdout]", result.stdout.rstrip("\n")]
    if result.stderr:
        parts += ["[stderr]", result.stderr.rstrip("\n")]
    return "\n".join(parts)


def _run(args: argparse.Namespace) -> int:
    import asyncio
    import json

    from spo_agents.sandboxes import make_backend

    _check_numbers(args)
    code = _read_code(args.file)
    options = _parse_options(args.option)
    if args.timeout is not None:
        options["timeout_s"] = args.timeout
    backend = make_backend(args.backend, **options)

    async def go():
        results = []
        try:
            async with await backend.open_session(stateless=args.stateless or None) as session:
                for _ in range(args.repeat):
                    results.append(await session.run(code, args.timeout))
        finally:
            await backend.aclose()
        return results

    results = asyncio.run(go())
    for i, r in enumerate(results):
        if args.pretty:
            print(_pretty(r, i, len(results)))
        else:
            d = r.to_dict()
            d["backend"] = args.backend
            d["isolation"] = backend.isolation
            print(json.dumps(d, ensure_ascii=False))
    return 0 if results[-1].ok else 1


def _list(args: argparse.Namespace) -> int:
    import json

    from spo_agents.registry import SANDBOXES, describe
    from spo_agents.sandboxes import backend_availability

    rows = []
    for spec in SANDBOXES.list():
        ok, reason = backend_availability(spec.id)
        rows.append(
            {"name": spec.id, "available": ok, "detail": reason, "source": spec.source, "description": describe(spec)}
        )
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    width = max(len(r["name"]) for r in rows) if rows else 4
    for r in rows:
        mark = "yes" if r["available"] else "no "
        print(f"{r['name']:<{width}}  available: {mark}  {r['detail']}")
        print(f"{'':<{width}}  {r['description']} ({r['source']})")
    return 0
