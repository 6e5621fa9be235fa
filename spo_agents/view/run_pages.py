"""The run pages: the index of every target, a run's overview (metric curves), and the comparison
of several runs on the same axes."""

from __future__ import annotations

import re
from typing import Any

from spo_agents.view.data import RunDir
from spo_agents.view.html import Layout, esc, href, num, table
from spo_agents.view.svg import PALETTE, Series, line_chart

# (title, metric keys, fixed y range); a chart is shown when the run logged one of its keys
CHARTS: list[tuple[str, list[str], tuple[float, float] | None]] = [
    ("Training reward", ["train/reward_mean", "train/accuracy"], None),
    ("Held-out evaluation", ["eval/avg_at_k", "eval/maj_at_k", "eval/pass_at_k"], (0.0, 1.0)),
    ("Advantages (std after / before normalising)", ["train/advantage_std", "train/advantage_raw_std"], None),
    (
        "v_hat of the batch, before the update",
        ["tracker/v_hat_p10", "tracker/v_hat_p50", "tracker/v_hat_p90", "tracker/v_hat_all_mean"],
        (0.0, 1.0),
    ),
    ("Forgetting factor rho", ["tracker/rho_min", "tracker/rho_mean", "tracker/rho_max"], None),
    ("Policy drift", ["tracker/drift", "tracker/drift_per_prompt_mean"], None),
    ("Sampler entropy / log N", ["sampler/entropy_ratio"], (0.0, 1.0)),
    ("Tool calls per episode", ["episode/tool_calls", "episode/tool_failures"], None),
    ("Infrastructure errors", ["episode/sandbox_errors", "episode/rollout_errors"], None),
    ("Throughput (generated tokens / s)", ["perf/tokens_per_s"], None),
    ("Share of the step's time", ["time/share_generate", "time/share_sandbox", "time/share_learner"], (0.0, 1.0)),
    ("Learner: clipping and KL", ["learner/clip_frac", "learner/approx_kl"], None),
    ("Learner: loss", ["learner/loss"], None),
    ("Learner: gradient norm", ["learner/grad_norm"], None),
    ("Episode length (tokens)", ["episode/generated_tokens", "episode/length_tokens"], None),
    ("Truncation and staleness", ["episode/truncation_rate", "episode/staleness"], None),
]

COMPARE_KEYS = [
    "train/reward_mean",
    "eval/avg_at_k",
    "eval/maj_at_k",
    "train/advantage_std",
    "tracker/v_hat_p50",
    "tracker/rho_mean",
    "tracker/drift",
    "sampler/entropy_ratio",
    "episode/tool_calls",
    "perf/tokens_per_s",
]
ALWAYS = {"Training reward", "Held-out evaluation"}


def index_page(layout: Layout) -> str:
    cards = []
    for i, t in enumerate(layout.targets):
        if isinstance(t, RunDir):
            rows = t.metrics()
            last = rows[-1] if rows else {}
            env = (t.config().get("env") or {}).get("id", "?")
            cards.append(
                [
                    f'<a href="{href(f"/r/{i}")}">{esc(t.name)}</a>',
                    "run",
                    esc(env),
                    num(last.get("step")),
                    num(_last(rows, "train/reward_mean")),
                    num(_last(rows, "eval/avg_at_k")),
                    "training" if t.live() else "",
                ]
            )
        else:
            rep = t.report()
            cards.append(
                [
                    f'<a href="{href(f"/e/{i}")}">{esc(t.name)}</a>',
                    "eval",
                    esc(t.settings().get("env", "")),
                    "",
                    "",
                    num(rep.get("avg_at_k")),
                    "",
                ]
            )
    heads = [
        ("name", ""),
        ("kind", ""),
        ("env", ""),
        ("step", "num"),
        ("train reward", "num"),
        ("held-out avg@k", "num"),
        ("", ""),
    ]
    return layout.render("runs", "<h1>Runs and evaluations</h1>" + table(heads, cards))


def overview_page(layout: Layout, i: int, run: RunDir) -> str:
    rows = run.metrics()
    cfg = run.config()
    last = rows[-1] if rows else {}
    eval_at = next((r.get("step") for r in reversed(rows) if "eval/avg_at_k" in r), None)
    k = _last(rows, "eval/k")
    kpis = [
        ("step", num(last.get("step"))),
        ("train reward (last)", num(_last(rows, "train/reward_mean"))),
        (
            f"held-out avg@{k or 'k'}" + (f" (step {eval_at})" if eval_at is not None else ""),
            num(_last(rows, "eval/avg_at_k")),
        ),
        ("elapsed", _duration(_last(rows, "time/elapsed_s"))),
        ("tokens / s", num(_last(rows, "perf/tokens_per_s"), 1)),
        ("env", esc((cfg.get("env") or {}).get("id", "?"))),
        ("model", esc((cfg.get("model") or {}).get("name", "?"))),
        ("algorithm", esc((cfg.get("algorithm") or {}).get("name", "?"))),
    ]
    body = [f"<h1>{esc(run.name)}</h1>", '<div class="kpis">']
    body += [f'<div class="kpi"><div class="v">{v}</div><div class="k">{esc(key)}</div></div>' for key, v in kpis]
    body.append("</div>")
    if not rows:
        body.append('<p class="notice">No metrics yet: `metrics.jsonl` is written after the first step.</p>')
    charts, shown = [], set()
    for title, keys, yr in CHARTS:
        present = [key for key in keys if _has(rows, key)]
        if not present and title not in ALWAYS:
            continue
        shown.update(keys)
        series = [_series(rows, key, PALETTE[n % len(PALETTE)]) for n, key in enumerate(present or keys)]
        charts.append(f'<div class="card">{line_chart(series, title=title, y_range=yr, chart_id=_slug(title))}</div>')
    body.append(f'<div class="grid">{"".join(charts)}</div>')
    other = sorted({key for r in rows for key in r if key != "step" and key not in shown and _has(rows, key)})
    if other:
        small = "".join(
            f'<div class="card">{line_chart([_series(rows, key)], title=key, height=190, chart_id=_slug(key))}</div>'
            for key in other
        )
        body.append(
            f'<details><summary>All other metrics ({len(other)})</summary><div class="grid">{small}</div></details>'
        )
    return layout.render(run.name, "".join(body), target=i, tab="overview", live=run.live())


def compare_page(layout: Layout, chosen: list[int]) -> str:
    runs = [(i, t) for i, t in enumerate(layout.targets) if isinstance(t, RunDir)]
    chosen = [i for i in chosen if any(i == j for j, _ in runs)] or [i for i, _ in runs]
    boxes = "".join(
        f'<label class="checks"><input type="checkbox" name="runs" value="{i}"{" checked" if i in chosen else ""}> '
        f"{esc(t.name)}</label>"
        for i, t in runs
    )
    parts = [
        "<h1>Compare runs</h1>",
        f'<form class="filter" method="get" action="/compare">{boxes}<button type="submit">Show</button></form>',
    ]
    data = {i: layout.targets[i].metrics() for i in chosen}
    charts = []
    for key in COMPARE_KEYS:
        if not any(_has(rows, key) for rows in data.values()):
            continue
        series = [
            _series(data[i], key, PALETTE[n % len(PALETTE)], layout.targets[i].name) for n, i in enumerate(chosen)
        ]
        charts.append(f'<div class="card">{line_chart(series, title=key, chart_id=_slug(key))}</div>')
    parts.append(
        f'<div class="grid">{"".join(charts)}</div>' if charts else '<p class="muted">No metrics to compare yet.</p>'
    )
    return layout.render("compare", "".join(parts), tab="compare")


def _series(rows: list[dict[str, Any]], key: str, color: str | None = None, label: str | None = None) -> Series:
    xs, ys = [], []
    for r in rows:
        v = r.get(key)
        if isinstance(v, (int, float)) and not isinstance(v, bool) and "step" in r:
            xs.append(float(r["step"]))
            ys.append(float(v))
    return Series(label or key, xs, ys, color)


def _has(rows: list[dict[str, Any]], key: str) -> bool:
    return any(isinstance(r.get(key), (int, float)) and not isinstance(r.get(key), bool) for r in rows)


def _last(rows: list[dict[str, Any]], key: str) -> Any:
    return next((r[key] for r in reversed(rows) if isinstance(r.get(key), (int, float))), None)


def _slug(text: str) -> str:
    return "chart-" + re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def _duration(s: Any) -> str:
    if not isinstance(s, (int, float)):
        return "—"
    m, sec = divmod(int(s), 60)
    h, m = divmod(m, 60)
    return f"{h}h {m:02d}m" if h else f"{m}m {sec:02d}s"
