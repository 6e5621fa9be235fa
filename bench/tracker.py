"""Benchmark of the SPO value tracker and prioritised sampler at data-set scale (SPO.md 1 and 4).

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

from spo_agents.sampler import PrioritizedSampler
from spo_agents.tracker import ValueTracker


def median_ms(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


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

    def update_distinct() -> None:
        tracker.add_drift(0.01)
        tracker.update(rng.choice(problems, batch, replace=False), rng.random(batch) < 0.5)

    def update_grouped() -> None:
        tracker.add_drift(0.01)
        idx = np.repeat(rng.choice(problems, batch // group, replace=False), group)
        tracker.update(idx, rng.random(idx.size) < 0.5)

    query = [ids[i] for i in rng.choice(problems, batch, replace=False)]
    sampler = PrioritizedSampler(problems, seed=seed)

    def sample() -> None:
        sampler.sample(tracker.v_hat(), batch)

    def sample_given_values() -> None:
        sampler.sample(v, batch)

    v = tracker.v_hat()
    return {
        "problems": problems,
        "batch": batch,
        "group": group,
        "repeats": repeats,
        "build_s": round(build_s, 3),
        "update_ms": median_ms(update_distinct, repeats),
        "update_grouped_ms": median_ms(update_grouped, repeats),
        "indices_ms": median_ms(lambda: tracker.indices(query), repeats),
        "sample_ms": median_ms(sample, repeats),
        "sample_given_v_hat_ms": median_ms(sample_given_values, repeats),
        "bytes_per_problem": tracker.nbytes / problems,
        "traced_bytes_per_problem": traced / problems,
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, CPython {platform.python_version()}, numpy {np.__version__}",
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
    rows = [
        ("construct (hash + sort ids)", f"{r['build_s']:.2f} s", ""),
        (f"update, {a.batch} distinct problems (median)", f"{r['update_ms']:.2f} ms", "< 5 ms"),
        (f"update, {a.batch // a.group} problems x {a.group} (median)", f"{r['update_grouped_ms']:.2f} ms", ""),
        (f"indices of {a.batch} string ids (median)", f"{r['indices_ms']:.2f} ms", ""),
        (f"sample {a.batch} by priority, incl. v_hat (median)", f"{r['sample_ms']:.2f} ms", "< 50 ms"),
        (f"sample {a.batch} by priority, v_hat given (median)", f"{r['sample_given_v_hat_ms']:.2f} ms", ""),
        ("tracker arrays, bytes / problem", f"{r['bytes_per_problem']:.1f}", "<= 32"),
        ("traced allocation after build, bytes / problem", f"{r['traced_bytes_per_problem']:.1f}", "<= 32"),
    ]
    print(f"ValueTracker with {a.problems:,} problems, batch {a.batch}, {a.repeats} repeats; {r['machine']}; load {r['load_avg_1min']}")
    w = max(len(x[0]) for x in rows)
    print(f"{'measure':<{w}}  {'value':>10}  target")
    for name, val, target in rows:
        print(f"{name:<{w}}  {val:>10}  {target}")


if __name__ == "__main__":
    main()
