"""`spo-agent plot RUN_DIR`: PNG curves of a run's `metrics.jsonl` (needs matplotlib).

One figure per metric group (`train`, `eval`, `tracker`, `learner`, `episode`, `time`, `perf`,
`sampler`), one panel per key, step on the x axis; written to `RUN_DIR/plots/<group>.png`.
Keys are documented in `spo_agents.training.metrics.METRICS`.
"""

from __future__ import annotations

import math
from pathlib import Path

from spo_agents.errors import ConfigError
from spo_agents.training.metrics import METRICS, read_metrics

GROUPS = ("train", "eval", "tracker", "learner", "episode", "time", "perf", "sampler")


def series(rows: list[dict]) -> dict[str, tuple[list[int], list[float]]]:
    """key -> (steps, values) for every numeric key present in `rows`."""
    out: dict[str, tuple[list[int], list[float]]] = {}
    for r in rows:
        step = int(r.get("step", 0))
        for k, v in r.items():
            if k == "step" or isinstance(v, bool) or not isinstance(v, (int, float)):
                continue
            xs, ys = out.setdefault(k, ([], []))
            xs.append(step)
            ys.append(float(v))
    return out


def plot_run(run_dir: str | Path, out_dir: str | Path | None = None) -> list[Path]:
    """Write one PNG per metric group; returns the files written."""
    run = Path(run_dir)
    rows = read_metrics(run / "metrics.jsonl")
    if not rows:
        raise ConfigError(
            f"`{run}/metrics.jsonl` is missing or empty; pass the directory of a run that has completed a step"
        )
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:
        raise ConfigError("`spo-agent plot` needs matplotlib: `pip install 'spo-agents[logging]'`") from e
    out = Path(out_dir) if out_dir is not None else run / "plots"
    out.mkdir(parents=True, exist_ok=True)
    data = series(rows)
    written = []
    for group in GROUPS:
        keys = [k for k in METRICS if k.startswith(group + "/") and k in data] + sorted(
            k for k in data if k.startswith(group + "/") and k not in METRICS
        )
        if not keys:
            continue
        cols = min(3, len(keys))
        nrows = math.ceil(len(keys) / cols)
        fig, axes = plt.subplots(nrows, cols, figsize=(4.2 * cols, 2.8 * nrows), squeeze=False)
        for ax, key in zip(axes.flat, keys):
            xs, ys = data[key]
            ax.plot(xs, ys, marker="o" if len(xs) < 30 else None, markersize=3, linewidth=1.2)
            ax.set_title(key, fontsize=9)
            ax.set_xlabel("step", fontsize=8)
            ax.tick_params(labelsize=7)
            ax.grid(alpha=0.3)
        for ax in list(axes.flat)[len(keys) :]:
            ax.axis("off")
        fig.suptitle(f"{run.name}: {group}", fontsize=10)
        fig.tight_layout()
        path = out / f"{group}.png"
        fig.savefig(path, dpi=90)
        plt.close(fig)
        written.append(path)
    return written
