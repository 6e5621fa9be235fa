"""The embedded CPU default end to end: held-out accuracy at step 0 vs the end, over seeds.

Runs `spo-agent train --env math-python train.seed=S [overrides]` for each seed (in parallel
with `--parallel`), then reads each run's `metrics.jsonl` and prints a markdown table: held-out
avg@k at step 0 and at the last evaluation, the steps done, wall-clock and CPU minutes. The CPU
minutes matter on a shared machine: on a dedicated 2-core machine a run's wall time is about its
CPU time / 2.

    python bench/train_cpu_default.py --seeds 0 1 --out runs/bench-cpu
    python bench/train_cpu_default.py --summarize runs/bench-cpu/seed0 runs/bench-cpu/seed1
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path


def summarize(run: Path) -> dict:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    evals = [(r["step"], r["eval/avg_at_k"]) for r in rows if r.get("eval/avg_at_k") is not None]
    train = [r for r in rows if "train/reward_mean" in r]
    info = json.loads((run / "bench.json").read_text()) if (run / "bench.json").is_file() else {}
    return {
        "run": str(run),
        "eval_first": evals[0] if evals else None,
        "eval_last": evals[-1] if evals else None,
        "evals": evals,
        "steps": train[-1]["step"] if train else 0,
        "reward_first3": sum(r["train/reward_mean"] for r in train[:3]) / max(1, len(train[:3])),
        "reward_last3": sum(r["train/reward_mean"] for r in train[-3:]) / max(1, len(train[-3:])),
        "elapsed_min": (train[-1]["time/elapsed_s"] / 60) if train else 0.0,
        **info,
    }


def table(results: list[dict]) -> str:
    out = [
        "| run | steps | held-out avg@k step 0 | held-out avg@k end (step) "
        "| train reward first 3 / last 3 steps | wall min | CPU min |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in results:
        e0 = f"{r['eval_first'][1]:.3f}" if r["eval_first"] else "-"
        e1 = f"{r['eval_last'][1]:.3f} ({r['eval_last'][0]})" if r["eval_last"] else "-"
        cpu = f"{r['cpu_min']:.1f}" if "cpu_min" in r else "-"
        wall = f"{r['wall_min']:.1f}" if "wall_min" in r else f"{r['elapsed_min']:.1f}"
        reward = f"{r['reward_first3']:.3f} / {r['reward_last3']:.3f}"
        out.append(f"| {Path(r['run']).name} | {r['steps']} | {e0} | {e1} | {reward} | {wall} | {cpu} |")
    return "\n".join(out)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--out", default="runs/bench-cpu")
    ap.add_argument("--parallel", action="store_true", help="run the seeds at the same time")
    ap.add_argument("--summarize", nargs="*", default=None, metavar="RUN_DIR", help="only summarise existing runs")
    ap.add_argument("overrides", nargs="*", help="extra dotted overrides for every run")
    args = ap.parse_args()
    if args.summarize is not None:
        print(table([summarize(Path(r)) for r in args.summarize]))
        return 0
    out = Path(args.out)
    procs = []
    for s in args.seeds:
        cmd = [
            sys.executable,
            "-m",
            "spo_agents",
            "train",
            "--env",
            "math-python",
            f"train.seed={s}",
            f"train.output_dir={out}",
            f"train.run_name=seed{s}",
            "logging.progress=false",
            *args.overrides,
        ]
        print("$", " ".join(cmd[2:]), file=sys.stderr)
        t0 = time.time()
        p = subprocess.Popen(cmd)
        procs.append((s, p, t0))
        if not args.parallel:
            p.wait()
            _record(out / f"seed{s}", t0, p)
    for s, p, t0 in procs:
        if p.returncode is None:
            p.wait()
            _record(out / f"seed{s}", t0, p)
    print(f"machine: {platform.machine()}, {platform.processor() or '?'}; python {platform.python_version()}")
    print(table([summarize(out / f"seed{s}") for s in args.seeds]))
    return 0


def _record(run: Path, t0: float, p: subprocess.Popen) -> None:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)  # cumulative over finished children
    (run / "bench.json").write_text(
        json.dumps(
            {
                "wall_min": (time.time() - t0) / 60,
                "cpu_min_all_children": (usage.ru_utime + usage.ru_stime) / 60,
                "returncode": p.returncode,
            }
        )
    )


if __name__ == "__main__":
    sys.exit(main())
