"""Benchmark of the SPO value tracker and prioritised sampler at data-set scale (docs/algorithm.md sections 1 and 4).

    .venv/bin/python bench/tracker.py                # table
    .venv/bin/python bench/tracker.py --json         # one JSON object
    .venv/bin/python bench/tracker.py --problems 100000 --batch 256

Measures, for a tracker of `--problems` ids:
- `update`: median time to fold one batch of `--batch` rewards in (add_drift + update),
  on distinct problems and on a batch of `--group` repeats per problem (batched extension);
- `indices`: median time to map `--batch` string ids to indices;
- `sample`: median time to draw `--batch` distinct problems by priority without replacement;
- memory: bytes per problem held by the tracker's arrays, and the allocation actually retained
  after construction as traced by `tracemalloc` (numpy reports its buffers to it).
Targets (task brief): update < 5 ms, sample < 50 ms, <= 32 bytes per problem.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
import tracemalloc

import numpy as np

from spo_agents.algorithm.sampler import PrioritizedSampler
from spo_agents.algorithm.tracker import ValueTracker


def median_ms(fn, repeats: int) -> tuple[float, float]:
    """Median wall-clock and median CPU time of this process, in ms (CPU time is less sensitive
    to other processes sharing the cores)."""
    wall, cpu = [], []
    for _ in range(repeats):
        t0, c0 = time.perf_counter(), time.process_time()
        fn()
        wall.append((time.perf_counter() - t0) * 1e3)
        cpu.append((time.process_time() - c0) * 1e3)
    return statistics.median(wall), statistics.median(cpu)


def run(problems: int, batch: int, group: int, repeats: int, seed: int) -> dict:
    ids = [f"problem-{i:08d}" for i in range(problems)]
    tracemalloc.start()  # a first build, traced (tracing slows it down: timed separately below)
    base = tracemalloc.get_traced_memory()[0]
    tracker = ValueTracker(ids)
    traced = tracemalloc.get_traced_memory()[0] - base
    tracemalloc.stop()
    del tracker
    t0 = time.perf_counter()
    tracker = ValueTracker(ids)
    build_s = time.perf_counter() - t0

    rng = np.random.default_rng(seed)
    tracker.init_offline(np.arange(problems), rng.integers(0, 9, problems), np.full(problems, 8))

    # batches drawn up front so that only the tracker is timed
    distinct = iter([(rng.choice(problems, batch, replace=False), rng.random(batch) < 0.5) for _ in range(repeats)])
    grouped = iter(
        [
            (
                np.repeat(rng.choice(problems, batch // group, replace=False), group),
                rng.random(batch // group * group) < 0.5,
            )
            for _ in range(repeats)
        ]
    )

    def update_distinct() -> None:
        tracker.add_drift(0.01)
        tracker.update(*next(distinct))

    def update_grouped() -> None:
        tracker.add_drift(0.01)
        tracker.update(*next(grouped))

    query = [ids[i] for i in rng.choice(problems, batch, replace=False)]
    sampler = PrioritizedSampler(problems, seed=seed)

    def sample() -> None:
        sampler.sample(tracker.v_hat(), batch)

    def sample_given_values() -> None:
        sampler.sample(v, batch)

    v = tracker.v_hat()
    timed = {
        "update": update_distinct,
        "update_grouped": update_grouped,
        "indices": lambda: tracker.indices(query),
        "sample": sample,
        "sample_given_v_hat": sample_given_values,
    }
    out = {"problems": problems, "batch": batch, "group": group, "repeats": repeats, "build_s": round(build_s, 3)}
    for name, fn in timed.items():
        out[f"{name}_ms"], out[f"{name}_cpu_ms"] = (round(x, 3) for x in median_ms(fn, repeats))
    return out | {
        "bytes_per_problem": tracker.nbytes / problems,
        "traced_bytes_per_problem": traced / problems,
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, "
        f"CPython {platform.python_version()}, numpy {np.__version__}",
        "load_avg_1min": round(os.getloadavg()[0], 2),  # other processes sharing the cores
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--problems", type=int, default=1_000_000)
    ap.add_argument("--batch", type=int, default=2048)
    ap.add_argument("--group", type=int, default=8, help="repeats per problem in the grouped update")
    ap.add_argument("--repeats", type=int, default=50)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    a = ap.parse_args()
    r = run(a.problems, a.batch, a.group, a.repeats, a.seed)
    if a.json:
        print(json.dumps(r))
        return
    ms = lambda k: f"{r[k + '_ms']:.2f} / {r[k + '_cpu_ms']:.2f} ms"  # noqa: E731
    rows = [
        ("construct (hash + sort ids)", f"{r['build_s']:.2f} s", ""),
        (f"update, {a.batch} distinct problems", ms("update"), "< 5 ms"),
        (f"update, {a.batch // a.group} problems x {a.group}", ms("update_grouped"), ""),
        (f"indices of {a.batch} string ids", ms("indices"), ""),
        (f"sample {a.batch} by priority, incl. v_hat", ms("sample"), "< 50 ms"),
        (f"sample {a.batch} by priority, v_hat given", ms("sample_given_v_hat"), ""),
        ("tracker arrays, bytes / problem", f"{r['bytes_per_problem']:.1f}", "<= 32"),
        ("traced allocation after build, bytes / problem", f"{r['traced_bytes_per_problem']:.1f}", "<= 32"),
    ]
    print(f"ValueTracker with {a.problems:,} problems, batch {a.batch}, {a.repeats} repeats")
    print(f"{r['machine']}; 1-minute load average {r['load_avg_1min']}")
    w = max(len(x[0]) for x in rows)
    print(f"{'measure (timings: median wall / median CPU)':<{w}}  {'value':>20}  target")
    for name, val, target in rows:
        print(f"{name:<{w}}  {val:>20}  {target}")


if __name__ == "__main__":
    main()
