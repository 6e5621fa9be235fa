"""Sandbox benchmark: call latency and throughput per backend.

For every available backend (and, side by side in the same run, a plain `python -c` subprocess
per call and, when a Docker engine answers, `docker exec` into a running container) it measures:

- session start: `open_session()` latency, sessions opened one after another (p50 / p99);
- calls: `print(sum(range(1000)))` at concurrency 1, 8 and 32 (that many sessions, each running
  calls back to back): latency p50 / p99 per call and calls per second over the whole level;
- for `local`, the same with stateless sessions (a fresh fork for every call).

Targets (for `local` with isolation on): call p50 <= 5 ms,
p99 <= 25 ms, >= 200 calls/s at concurrency 8 on 2 cores, session start <= 50 ms.

    .venv/bin/python bench/sandbox.py                      # every available backend + baselines
    .venv/bin/python bench/sandbox.py --backends local --calls 400 --json /tmp/sandbox.json

Results, with the machine they were measured on, go in bench/RESULTS.md (`## Sandbox`).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field

CODE = "print(sum(range(1000)))"
EXPECTED = "499500"


@dataclass
class Level:
    concurrency: int
    calls: int
    p50_ms: float
    p99_ms: float
    calls_per_s: float
    errors: int = 0


@dataclass
class Row:
    target: str
    isolation: str = ""
    worker_start_s: float | None = None
    session_start_p50_ms: float | None = None
    session_start_p99_ms: float | None = None
    levels: list[Level] = field(default_factory=list)
    note: str = ""


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    s = sorted(values)
    k = min(len(s) - 1, max(0, int(round(q / 100 * (len(s) - 1)))))
    return s[k]


def level_from(concurrency: int, lat: list[float], wall: float, errors: int) -> Level:
    return Level(
        concurrency, len(lat), pct(lat, 50) * 1e3, pct(lat, 99) * 1e3, len(lat) / wall if wall > 0 else 0.0, errors
    )


# --- sandbox backends ---------------------------------------------------------------------------
async def bench_backend(
    name: str, levels: list[int], calls: int, starts: int, options: dict, stateless: bool = False
) -> Row:
    from spo_agents.sandboxes import make_backend

    backend = make_backend(name, **options)
    row = Row(target=name + (" (stateless)" if stateless else ""), isolation=str(getattr(backend, "isolation", "")))
    try:
        if hasattr(backend, "start"):
            t0 = time.perf_counter()
            await asyncio.get_running_loop().run_in_executor(None, backend.start)
            row.worker_start_s = time.perf_counter() - t0
        # Session start, one after another.
        times = []
        for _ in range(starts):
            t0 = time.perf_counter()
            s = await backend.open_session(stateless=stateless)
            times.append(time.perf_counter() - t0)
            await s.close()
        row.session_start_p50_ms, row.session_start_p99_ms = pct(times, 50) * 1e3, pct(times, 99) * 1e3
        for c in levels:
            sessions = await asyncio.gather(*[backend.open_session(stateless=stateless) for _ in range(c)])
            try:
                await asyncio.gather(*[s.run(CODE) for s in sessions])  # warm each session
                per_session = max(1, calls // c)
                lat: list[float] = []
                errors = 0

                async def worker(s, per_session: int, lat: list[float]) -> None:
                    nonlocal errors
                    for _ in range(per_session):
                        t = time.perf_counter()
                        r = await s.run(CODE)
                        lat.append(time.perf_counter() - t)
                        errors += r.stdout.strip() != EXPECTED

                t0 = time.perf_counter()
                await asyncio.gather(*[worker(s, per_session, lat) for s in sessions])
                row.levels.append(level_from(c, lat, time.perf_counter() - t0, errors))
            finally:
                await asyncio.gather(*[s.close() for s in sessions])
    finally:
        await backend.aclose()
    return row


# --- baselines ----------------------------------------------------------------------------------
async def bench_python_c(levels: list[int], calls: int) -> Row:
    row = Row(target="python -c (subprocess per call)", isolation="none", note=sys.executable)
    for c in levels:
        sem = asyncio.Semaphore(c)
        lat: list[float] = []
        errors = 0
        n = max(calls // 4, c)  # a fresh interpreter per call is slow; fewer calls keep the run short

        async def one(sem: asyncio.Semaphore, lat: list[float]) -> None:
            nonlocal errors
            async with sem:
                t = time.perf_counter()
                p = await asyncio.create_subprocess_exec(sys.executable, "-c", CODE, stdout=asyncio.subprocess.PIPE)
                out, _ = await p.communicate()
                lat.append(time.perf_counter() - t)
                errors += out.decode().strip() != EXPECTED

        t0 = time.perf_counter()
        await asyncio.gather(*[one(sem, lat) for _ in range(n)])
        row.levels.append(level_from(c, lat, time.perf_counter() - t0, errors))
    return row


def docker_exec_target() -> tuple[object, str] | None:
    """(client, image) when a Docker engine answers and has the sandbox image, else None."""
    try:
        import docker  # noqa: F401

        from spo_agents.sandboxes.docker.backend import DEFAULT_IMAGE, engine_url
    except ImportError:
        return None
    try:
        import docker as sdk

        client = sdk.DockerClient(base_url=engine_url()) if engine_url() else sdk.from_env()
        client.ping()
        client.images.get(DEFAULT_IMAGE)
    except Exception:  # noqa: BLE001 - no engine or no image: the baseline is skipped
        return None
    return client, DEFAULT_IMAGE


async def bench_docker_exec(levels: list[int], calls: int, client, image: str) -> Row:
    row = Row(target="docker exec (SDK, per call)", isolation="container", note=image)
    loop = asyncio.get_running_loop()
    t0 = time.perf_counter()
    container = client.containers.run(
        image, ["sleep", "infinity"], detach=True, network_mode="none", labels={"spo-agents.bench": "1"}
    )
    row.session_start_p50_ms = (time.perf_counter() - t0) * 1e3
    row.note += " (session start = one `docker run -d`)"
    try:
        for c in levels:
            sem = asyncio.Semaphore(c)
            lat: list[float] = []
            errors = 0
            n = max(calls // 4, c)  # docker exec is ~10x slower; fewer calls keep the run short

            async def one(sem: asyncio.Semaphore, lat: list[float]) -> None:
                nonlocal errors
                async with sem:
                    t = time.perf_counter()
                    res = await loop.run_in_executor(None, lambda: container.exec_run(["python3", "-c", CODE]))
                    lat.append(time.perf_counter() - t)
                    errors += res.output.decode().strip() != EXPECTED

            t1 = time.perf_counter()
            await asyncio.gather(*[one(sem, lat) for _ in range(n)])
            row.levels.append(level_from(c, lat, time.perf_counter() - t1, errors))
    finally:
        container.remove(force=True)
    return row


# --- report -------------------------------------------------------------------------------------
def machine() -> dict:
    cpu = ""
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "")
    except OSError:
        pass
    bwrap = (
        subprocess.run(["bwrap", "--version"], capture_output=True, text=True).stdout.strip()
        if shutil_which("bwrap")
        else "absent"
    )
    return {
        "cpus": os.cpu_count(),
        "cpu": cpu,
        "kernel": platform.release(),
        "python": platform.python_version(),
        "bubblewrap": bwrap,
        "loadavg_at_start": os.getloadavg(),
        "date_utc": time.strftime("%Y-%m-%d %H:%M", time.gmtime()),
    }


def shutil_which(name: str) -> str | None:
    import shutil

    return shutil.which(name)


def table(rows: list[Row], levels: list[int]) -> str:
    head = (
        "| target | isolation | session start p50 / p99 (ms) | "
        + " | ".join(f"c={c}: p50 / p99 (ms), calls/s" for c in levels)
        + " |"
    )
    sep = "|" + "---|" * (3 + len(levels))
    lines = [head, sep]
    for r in rows:
        start = (
            "-"
            if r.session_start_p50_ms is None
            else (
                f"{r.session_start_p50_ms:.1f}"
                + (f" / {r.session_start_p99_ms:.1f}" if r.session_start_p99_ms is not None else "")
            )
        )
        cells = []
        by_c = {lv.concurrency: lv for lv in r.levels}
        for c in levels:
            lv = by_c.get(c)
            cells.append(
                "-"
                if lv is None
                else f"{lv.p50_ms:.2f} / {lv.p99_ms:.2f}, {lv.calls_per_s:.0f}"
                + (f" ({lv.errors} wrong)" if lv.errors else "")
            )
        lines.append(f"| {r.target} | {r.isolation.split(' (')[0]} | {start} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


async def main_async(args: argparse.Namespace) -> list[Row]:
    from spo_agents.sandboxes import available_backends

    levels = [int(x) for x in args.concurrency.split(",")]
    avail = available_backends()
    wanted = args.backends.split(",") if args.backends else [n for n, (ok, _) in avail.items() if ok]
    rows: list[Row] = []
    for name in wanted:
        ok, reason = avail.get(name, (False, "not registered"))
        if not ok:
            print(f"skip backend `{name}`: {reason}", file=sys.stderr)
            continue
        options = json.loads(args.options) if args.options and name == "local" else {}
        print(f"benchmarking backend `{name}` ...", file=sys.stderr)
        rows.append(await bench_backend(name, levels, args.calls, args.starts, options))
        if name == "local" and not args.no_stateless:
            print("benchmarking backend `local` (stateless) ...", file=sys.stderr)
            rows.append(await bench_backend(name, levels, args.calls // 4, args.starts, options, stateless=True))
    if not args.no_baselines:
        print("benchmarking python -c ...", file=sys.stderr)
        rows.append(await bench_python_c(levels, args.calls))
        target = docker_exec_target()
        if target is None:
            print("skip docker exec: no Docker engine with the sandbox image", file=sys.stderr)
        else:
            print("benchmarking docker exec ...", file=sys.stderr)
            rows.append(await bench_docker_exec(levels, args.calls, *target))
    return rows


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--backends", default="", help="comma-separated backend names (default: every available one)")
    p.add_argument("--concurrency", default="1,8,32")
    p.add_argument("--calls", type=int, default=400, help="calls per concurrency level and target")
    p.add_argument("--starts", type=int, default=50, help="sessions opened for the session-start figure")
    p.add_argument(
        "--options", default="", help='JSON options for the local backend, e.g. \'{"isolation": "unshare"}\''
    )
    p.add_argument("--no-baselines", action="store_true", help="skip python -c and docker exec")
    p.add_argument("--no-stateless", action="store_true", help="skip the stateless `local` row (a fresh fork per call)")
    p.add_argument("--json", default="", help="also write the raw figures to this file")
    args = p.parse_args()
    info = machine()
    rows = asyncio.run(main_async(args))
    levels = [int(x) for x in args.concurrency.split(",")]
    print(f"\nmachine: {info}")
    for r in rows:
        if r.worker_start_s is not None:
            print(f"{r.target}: worker start (once per backend) {r.worker_start_s * 1e3:.0f} ms")
    print()
    print(table(rows, levels))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"machine": info, "args": vars(args), "rows": [asdict(r) for r in rows]}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
