"""HTML pages of the viewer. Every value that comes from a run (model text, tool output, problem
ids, answers, config values) goes through `esc`; URLs are built with `href`.

Pages: the run overview (metric curves), problems (the tracker's table) and one problem's
history, the saved training trajectories and one trajectory, eval dirs (per-problem pass@k,
maj@k, answer clusters, every transcript), and the comparison of several runs.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Sequence
from html import escape
from typing import Any
from urllib.parse import quote, urlencode

from spo_agents.view.data import EvalDir, ProblemRow, RunDir, clusters_of
from spo_agents.view.svg import PALETTE, Series, line_chart

PAGE_SIZE = 100
REFRESH_S = 10

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


# --------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------
def esc(value: Any) -> str:
    """Text for HTML (content and attribute values)."""
    return escape("" if value is None else str(value), quote=True)


def href(path: str, **params: Any) -> str:
    """A URL: `path` (segments already quoted) with the non-None `params` as a query, escaped
    for an attribute."""
    query = urlencode([(k, v) for k, v in params.items() if v is not None and v != ""], doseq=True)
    return esc(path + ("?" + query if query else ""))


def num(v: Any, digits: int = 3) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "—"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, int):
        return f"{v:,}"
    return f"{v:.{digits}f}"


def verdict(correct: Any) -> str:
    if correct is None:
        return '<span class="muted">—</span>'
    return '<span class="ok">✓</span>' if correct else '<span class="bad">✗</span>'


def facts(items: Iterable[tuple[str, Any]]) -> str:
    cells = "".join(f'<div class="fact"><div class="k">{esc(k)}</div><div class="v">{v}</div></div>' for k, v in items)
    return f'<div class="facts">{cells}</div>'


def table(headers: Sequence[tuple[str, str]], rows: Iterable[Sequence[str]], cls: str = "data") -> str:
    """`headers`: (html, css class); rows: cells as HTML."""
    head = "".join(f'<th class="{c}">{h}</th>' for h, c in headers)
    body = "".join(
        "<tr>" + "".join(f'<td class="{headers[i][1]}">{cell}</td>' for i, cell in enumerate(r)) + "</tr>" for r in rows
    )
    return f'<table class="{cls}"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'


def bar(v: float | None) -> str:
    """A small horizontal bar for a value in [0, 1]."""
    if v is None or not math.isfinite(v):
        return ""
    return f'<span class="track"><span class="fill f{max(0, min(10, round(v * 10)))}"></span></span>'


class Layout:
    """The frame around every page: the top bar with the targets and a run's tabs."""

    def __init__(self, targets: Sequence[RunDir | EvalDir], refresh_s: int = REFRESH_S) -> None:
        self.targets = targets
        self.refresh_s = refresh_s

    def render(self, title: str, body: str, *, target: int | None = None, tab: str = "", live: bool = False) -> str:
        links = []
        for i, t in enumerate(self.targets):
            base = f"/r/{i}" if isinstance(t, RunDir) else f"/e/{i}"
            on = ' class="on"' if i == target else ""
            links.append(f'<a{on} href="{href(base)}">{esc(t.name)}</a>')
        runs = [i for i, t in enumerate(self.targets) if isinstance(t, RunDir)]
        if len(runs) > 1:
            on = ' class="on"' if tab == "compare" else ""
            links.append(f'<a{on} href="{href("/compare")}">compare</a>')
        live_badge = f'<span class="live">● training: refreshing every {self.refresh_s} s</span>' if live else ""
        tabs = ""
        if target is not None and isinstance(self.targets[target], RunDir):
            base = f"/r/{target}"
            names = [
                ("overview", base),
                ("problems", base + "/problems"),
                ("trajectories", base + "/trajectories"),
                ("evals", base + "/evals"),
            ]
            tabs = (
                '<div class="tabs">'
                + "".join(f'<a{" class=on" if tab == n else ""} href="{href(u)}">{n}</a>' for n, u in names)
                + "</div>"
            )
        refresh = f' data-refresh="{self.refresh_s}"' if live else ""
        return (
            "<!doctype html><html lang=en><head><meta charset=utf-8>"
            '<meta name="viewport" content="width=device-width, initial-scale=1">'
            f"<title>{esc(title)} · spo-agent view</title>"
            '<link rel="icon" href="/static/icon.svg" type="image/svg+xml">'
            '<link rel="stylesheet" href="/static/view.css"><script src="/static/view.js" defer></script></head><body>'
            '<header class="top"><a class="brand" href="/">spo-agent view</a>'
            f"<nav>{''.join(links)}</nav>{live_badge}</header>"
            f"{tabs}<main{refresh}>{body}</main></body></html>"
        )


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


# --------------------------------------------------------------------------------------------
# Index and run overview
# --------------------------------------------------------------------------------------------
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


def _last(rows: list[dict[str, Any]], key: str) -> Any:
    return next((r[key] for r in reversed(rows) if isinstance(r.get(key), (int, float))), None)


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


def _slug(text: str) -> str:
    return "chart-" + re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def _duration(s: Any) -> str:
    if not isinstance(s, (int, float)):
        return "—"
    m, sec = divmod(int(s), 60)
    h, m = divmod(m, 60)
    return f"{h}h {m:02d}m" if h else f"{m}m {sec:02d}s"


# --------------------------------------------------------------------------------------------
# Problems
# --------------------------------------------------------------------------------------------
SORTS = {
    "problem": lambda r: r.label,
    "v_hat": lambda r: r.v_hat,
    "alpha": lambda r: r.alpha,
    "beta": lambda r: r.beta,
    "n_eff": lambda r: r.n_eff,
    "visits": lambda r: r.visits,
    "last_reward": lambda r: r.last_reward,
    "last_step": lambda r: r.last_step,
    "prob": lambda r: r.prob,
}


def _sorted(rows: list[ProblemRow], key: str, desc: bool) -> list[ProblemRow]:
    get = SORTS.get(key, SORTS["prob"])
    have = [r for r in rows if get(r) is not None]
    missing = [r for r in rows if get(r) is None]
    return sorted(have, key=get, reverse=desc) + missing


def problems_page(layout: Layout, i: int, run: RunDir, q: dict[str, str]) -> str:
    rows = run.problem_rows()
    view = run.tracker()
    sort, desc = q.get("sort", "prob"), q.get("desc", "1") == "1"
    text, visited = q.get("q", ""), q.get("visited") == "1"
    sel = [r for r in rows if (not text or text.lower() in r.label.lower()) and (not visited or r.visits > 0)]
    sel = _sorted(sel, sort, desc)
    page = max(1, int(q.get("page", "1") or 1) if q.get("page", "1").isdigit() else 1)
    pages = max(1, math.ceil(len(sel) / PAGE_SIZE))
    page = min(page, pages)
    shown = sel[(page - 1) * PAGE_SIZE : page * PAGE_SIZE]
    base = f"/r/{i}/problems"

    def head(label: str, key: str, cls: str = "num") -> tuple[str, str]:
        on = key == sort
        arrow = (" ▾" if desc else " ▴") if on else ""
        link = href(base, q=text, visited="1" if visited else None, sort=key, desc="0" if on and desc else "1")
        return f'<a class="{"on" if on else ""}" href="{link}">{esc(label)}{arrow}</a>', cls

    headers = [
        head("problem", "problem", ""),
        head("v_hat", "v_hat", "bar"),
        head("alpha", "alpha"),
        head("beta", "beta"),
        head("alpha + beta", "n_eff"),
        head("visits", "visits"),
        head("last reward", "last_reward"),
        head("last step", "last_step"),
        head("P(next draw)", "prob"),
    ]
    body_rows = []
    for r in shown:
        name = esc(r.label)
        if r.problem_id is not None:
            name = f'<a href="{href(f"/r/{i}/problem", id=r.problem_id)}">{name}</a>'
        prob = "—" if r.prob is None else f"{100 * r.prob:.3f}%"
        body_rows.append(
            [
                f'<span class="mono">{name}</span>',
                bar(r.v_hat) + num(r.v_hat),
                num(r.alpha, 2),
                num(r.beta, 2),
                num(r.n_eff, 2),
                num(r.visits),
                num(r.last_reward, 2),
                num(r.last_step),
                prob,
            ]
        )
    parts = ["<h1>Problems</h1>"]
    if view is not None:
        parts.append(
            f'<p class="muted">Tracker of checkpoint <b>{esc(view.checkpoint)}</b> (step {view.step}); '
            f"visits and last rewards from the visit log; P(next draw): {esc(view.note)}.</p>"
        )
    else:
        parts.append('<p class="notice">No checkpoint yet: visits and rewards come from the visit log only.</p>')
    checked = " checked" if visited else ""
    parts.append(
        f'<form class="filter" method="get" action="{href(base)}"><input type="text" name="q" value="{esc(text)}" '
        'placeholder="filter by problem id"><label class="checks">'
        f'<input type="checkbox" name="visited" value="1"{checked}> '
        f'visited only</label><input type="hidden" name="sort" value="{esc(sort)}"><input type="hidden" name="desc" '
        f'value="{"1" if desc else "0"}"><button type="submit">Filter</button>'
        f'<span class="muted small">{len(sel):,} of {len(rows):,} problems</span></form>'
    )
    parts.append(table(headers, body_rows))
    parts.append(
        _pager(base, page, pages, q=text, visited="1" if visited else None, sort=sort, desc="1" if desc else "0")
    )
    return layout.render("problems", "".join(parts), target=i, tab="problems", live=run.live())


def _pager(base: str, page: int, pages: int, **params: Any) -> str:
    if pages <= 1:
        return ""
    prev = f'<a href="{href(base, page=page - 1, **params)}">← previous</a>' if page > 1 else ""
    nxt = f'<a href="{href(base, page=page + 1, **params)}">next →</a>' if page < pages else ""
    return f'<div class="pager">{prev}<span class="muted">page {page} of {pages}</span>{nxt}</div>'


def problem_page(layout: Layout, i: int, run: RunDir, problem_id: str) -> str:
    visits = run.log.visits(problem_id)
    saved = {(r.step, r.index): r for r in run.log.for_problem(problem_id)}
    row = next((r for r in run.problem_rows() if r.problem_id == problem_id), None)
    parts = [f'<h1 class="mono">{esc(problem_id)}</h1>']
    if row is not None:
        prob = "—" if row.prob is None else f"{100 * row.prob:.3f}%"
        parts.append(
            facts(
                [
                    ("v_hat", num(row.v_hat)),
                    ("alpha", num(row.alpha, 2)),
                    ("beta", num(row.beta, 2)),
                    ("visits", num(len(visits))),
                    ("P(next draw)", prob),
                    ("saved trajectories", num(len(saved))),
                ]
            )
        )
    if visits:
        steps = [float(v.step) for v in visits]
        values = line_chart(
            [
                Series("v_hat before the visit", steps, [v.v_hat_before for v in visits]),
                Series("reward", steps, [v.reward for v in visits]),
            ],
            title="v_hat and reward at each visit",
            chart_id="chart-visits",
        )
        adv = line_chart(
            [Series("advantage", steps, [v.advantage for v in visits]), Series("rho", steps, [v.rho for v in visits])],
            title="Advantage and rho at each visit",
            chart_id="chart-advantages",
        )
        parts.append(f'<div class="grid"><div class="card">{values}</div><div class="card">{adv}</div></div>')
    headers = [
        ("step", "num"),
        ("reward", "num"),
        ("correct", ""),
        ("v_hat before", "num"),
        ("rho", "num"),
        ("advantage", "num"),
        ("policy version", "num"),
        ("trajectory", ""),
    ]
    body = []
    for v in reversed(visits):
        link = '<span class="muted">not kept</span>'
        if (v.step, v.index) in saved:
            link = f'<a class="traj-link" href="{href(f"/r/{i}/traj", step=v.step, index=v.index)}">open</a>'
        body.append(
            [
                num(v.step),
                num(v.reward, 2),
                verdict(v.correct),
                num(v.v_hat_before),
                num(v.rho),
                num(v.advantage),
                num(v.policy_version),
                link,
            ]
        )
    parts.append("<h2>Every visit</h2>")
    parts.append(table(headers, body) if body else '<p class="muted">No visit logged for this problem.</p>')
    return layout.render(problem_id, "".join(parts), target=i, tab="problems", live=run.live())


# --------------------------------------------------------------------------------------------
# Training trajectories
# --------------------------------------------------------------------------------------------
def trajectories_page(layout: Layout, i: int, run: RunDir, q: dict[str, str]) -> str:
    steps = run.log.steps()
    parts = ["<h1>Saved training trajectories</h1>"]
    meta = run.log.meta()
    if not steps:
        parts.append('<p class="notice">This run saved no training trajectories (`trajectories/` is empty).</p>')
        return layout.render("trajectories", "".join(parts), target=i, tab="trajectories")
    parts.append(
        f'<p class="muted">Every trajectory of the last {esc(meta.get("keep_last_steps", "?"))} steps and a seeded '
        f"sample of older ones ({esc(meta.get('older_sample', '?'))} of them, at most "
        f"{esc(meta.get('older_max', '?'))}).</p>"
    )
    want = q.get("step", "")
    step = int(want) if want.isdigit() and int(want) in steps else steps[-1]
    links = " ".join(
        f'<a href="{href(f"/r/{i}/trajectories", step=s)}"{" class=on" if s == step else ""}>{s}</a>'
        if s != step
        else f"<b>{s}</b>"
        for s in steps[-60:]
    )
    parts.append(f'<p class="small">Steps: {links}</p>')
    recs = run.log.read_step(step)
    headers = [
        ("#", "num"),
        ("problem", ""),
        ("reward", "num"),
        ("advantage", "num"),
        ("v_hat before", "num"),
        ("answer", ""),
        ("tool calls", "num"),
        ("tokens", "num"),
        ("", ""),
    ]
    body = [
        [
            num(r.index),
            f'<span class="mono">{esc(r.problem_id)}</span>',
            num(r.reward, 2),
            num(r.advantage),
            num(r.v_hat_before),
            f'<span class="mono">{esc(r.answer)}</span> {verdict(r.correct)}',
            num(len(r.tool_calls)),
            num(len(r.token_ids())),
            f'<a class="traj-link" href="{href(f"/r/{i}/traj", step=r.step, index=r.index)}">open</a>',
        ]
        for r in recs
    ]
    batch = recs[0].batch_size if recs else 0
    parts.append(f"<h2>Step {step}: {len(recs)} of {batch} trajectories kept</h2>")
    parts.append(table(headers, body))
    return layout.render("trajectories", "".join(parts), target=i, tab="trajectories", live=run.live())


def _code_parts(text: str) -> list[list[str]]:
    """`<code>...</code>` blocks of a model text as code parts (for eval transcripts)."""
    out, pos = [], 0
    for m in re.finditer(r"(<code>)(.*?)(</code>)", text, re.DOTALL):
        out.append(["text", text[pos : m.start(2)]])
        out.append(["code", m.group(2)])
        pos = m.end(2)
    out.append(["text", text[pos:]])
    return [p for p in out if p[1]]


def _model_turn(parts: list[list[str]], tags: str, tokens: str = "") -> str:
    inner = tokens or "".join(
        f'<pre class="code">{esc(t)}</pre>' if kind == "code" else f'<pre class="text">{esc(t)}</pre>'
        for kind, t in parts
    )
    return f'<div class="turn model"><div class="who">model {tags}</div>{inner}</div>'


def _env_turn(text: str, tags: str) -> str:
    return f'<div class="turn env"><div class="who">environment {tags}</div><pre class="reply">{esc(text)}</pre></div>'


def _lp_class(lp: float) -> str:
    p = math.exp(lp) if math.isfinite(lp) else 0.0
    return f"lp{min(7, int((1.0 - p) * 8))}"


def _tokens(pieces: list[str], logprobs: list[float]) -> str:
    return "".join(
        f'<span class="tok {_lp_class(lp)}" title="log p = {lp:.3f}">{esc(piece)}</span>'
        for piece, lp in zip(pieces, logprobs)
    )


def trajectory_page(layout: Layout, i: int, run: RunDir, step: int, index: int, shade: bool) -> str | None:
    rec = run.log.get(step, index)
    if rec is None:
        return None
    calls = rec.tool_calls
    has_lp = any(s.pieces for s in rec.segments)
    parts = [f'<h1>Step {rec.step}, trajectory {rec.index} <span class="muted">of {rec.batch_size}</span></h1>']
    parts.append(
        facts(
            [
                (
                    "problem",
                    f'<a class="mono" href="{href(f"/r/{i}/problem", id=rec.problem_id)}">{esc(rec.problem_id)}</a>',
                ),
                ("reward", num(rec.reward, 2) + " " + verdict(rec.correct)),
                ("answer", f'<span class="mono">{esc(rec.answer)}</span>'),
                ("advantage", num(rec.advantage)),
                ("v_hat before", num(rec.v_hat_before)),
                ("rho", num(rec.rho)),
                ("policy version", esc(", ".join(map(str, rec.policy_versions)) or rec.policy_version)),
                ("tokens (trained / all)", f"{sum(rec.loss_mask()):,} / {len(rec.token_ids()):,}"),
                ("ended", "terminated" if rec.terminated else "truncated" if rec.truncated else "—"),
                ("env", esc(rec.env_id)),
            ]
        )
    )
    nav = [
        f'<a href="{href(f"/r/{i}/traj", step=step, index=index - 1)}">← previous</a>' if index > 0 else "",
        f'<a href="{href(f"/r/{i}/trajectories", step=step)}">step {step}</a>',
        f'<a href="{href(f"/r/{i}/traj", step=step, index=index + 1)}">next →</a>',
    ]
    if has_lp:
        nav.append(
            f'<a href="{href(f"/r/{i}/traj", step=step, index=index, lp=None if shade else "1")}">'
            f"{'plain text' if shade else 'shade tokens by log-prob'}</a>"
        )
    parts.append('<p class="pager">' + " ".join(nav) + "</p>")
    if shade and has_lp:
        legend = "".join(
            f'<span class="lp{n}">{label}</span>' for n, label in enumerate(["p≈1", "", "", "", "0.5", "", "", "p≈0"])
        )
        parts.append(f'<p class="small legend-lp">Token probability under the behaviour policy: {legend}</p>')
    convo = ['<div class="convo">']
    if rec.prompt_text is not None:
        convo.append(
            f"<details><summary>prompt ({rec.prompt_tokens:,} tokens, not trained)</summary>"
            f'<div class="turn prompt"><pre class="text">{esc(rec.prompt_text)}</pre></div></details>'
        )
    for seg in rec.segments:
        if seg.kind == "model":
            tags = f'<span class="tag trained">trained · {len(seg.tokens):,} tokens</span>'
            tokens = _tokens(seg.pieces, seg.logprobs) if shade and seg.pieces and seg.logprobs else ""
            tokens = f'<pre class="text">{tokens}</pre>' if tokens else ""
            parts_ = seg.parts or [["text", seg.text if seg.text is not None else f"(token ids) {seg.tokens}"]]
            convo.append(_model_turn(parts_, tags, tokens))
        else:
            tag = f'<span class="tag">not trained · {len(seg.tokens):,} tokens</span>'
            if seg.tool_call is not None and seg.tool_call < len(calls):
                c = calls[seg.tool_call]
                state = "ok" if c.get("ok") else "timed out" if c.get("timed_out") else "failed"
                cls = "good" if c.get("ok") else "bad"
                took = f"{c.get('duration_s', 0.0):.2f} s"
                tag += f' <span class="tag {cls}">tool call {seg.tool_call + 1}: {state} · {took}</span>'
            convo.append(_env_turn(seg.text if seg.text is not None else f"(token ids) {seg.tokens}", tag))
    convo.append("</div>")
    parts.extend(convo)
    return layout.render(f"step {step} #{index}", "".join(parts), target=i, tab="trajectories")


# --------------------------------------------------------------------------------------------
# Eval dirs
# --------------------------------------------------------------------------------------------
def evals_page(layout: Layout, i: int, run: RunDir) -> str:
    names = run.eval_names()
    parts = ["<h1>Held-out evaluations</h1>"]
    rows_ = []
    steps, avg, maj = [], [], []
    for name in names:
        rep = run.eval_dir(name).report()
        m = re.match(r"step-(\d+)$", name)
        if m and "avg_at_k" in rep:
            steps.append(float(int(m.group(1))))
            avg.append(rep.get("avg_at_k"))
            maj.append(rep.get("maj_at_k"))
        rows_.append(
            [
                f'<a href="{href(f"/r/{i}/eval/{quote(name)}")}">{esc(name)}</a>',
                num(rep.get("num_problems")),
                num(rep.get("k")),
                num(rep.get("avg_at_k")),
                num(rep.get("maj_at_k")),
                num(rep.get("errors")),
            ]
        )
    if steps:
        chart = line_chart(
            [Series("avg@k", steps, avg), Series("maj@k", steps, maj)],
            title="Held-out accuracy by step",
            y_range=(0.0, 1.0),
            chart_id="chart-evals",
        )
        parts.append(f'<div class="grid"><div class="card">{chart}</div></div><h2>Evaluations</h2>')
    headers = [
        ("eval dir", ""),
        ("problems", "num"),
        ("k", "num"),
        ("avg@k", "num"),
        ("maj@k", "num"),
        ("errors", "num"),
    ]
    parts.append(table(headers, rows_) if rows_ else '<p class="muted">No eval dir under `eval/` yet.</p>')
    return layout.render("evals", "".join(parts), target=i, tab="evals", live=run.live())


def eval_page(layout: Layout, base: str, ev: EvalDir, q: dict[str, str], target: int, tab: str) -> str:
    rep = ev.report()
    samples = ev.samples()
    k = rep.get("k", "k")
    pass_k = rep.get("pass_at_k") or {}
    kpis = [(f"avg@{k}", num(rep.get("avg_at_k"))), (f"maj@{k}", num(rep.get("maj_at_k")))]
    kpis += [(f"pass@{j}", num(v)) for j, v in pass_k.items()]
    kpis += [
        ("problems", num(rep.get("num_problems"))),
        ("samples", num(rep.get("num_samples"))),
        ("infra errors", num(rep.get("errors"))),
    ]
    parts = [f"<h1>Evaluation {esc(ev.name)}</h1>"]
    if rep.get("partial"):
        parts.append(
            '<p class="notice">No `results.json` yet: figures computed from the transcripts written so far.</p>'
        )
    parts.append(
        '<div class="kpis">'
        + "".join(f'<div class="kpi"><div class="v">{v}</div><div class="k">{esc(n)}</div></div>' for n, v in kpis)
        + "</div>"
    )
    settings = ev.settings()
    if settings:
        shown = ", ".join(f"{esc(key)}: {esc(v)}" for key, v in settings.items() if not isinstance(v, dict))
        parts.append(f'<p class="muted small">{shown}</p>')
    text, wrong = q.get("q", ""), q.get("wrong") == "1"
    checked = " checked" if wrong else ""
    parts.append(
        f'<form class="filter" method="get" action="{href(base)}"><input type="text" name="q" value="{esc(text)}" '
        'placeholder="filter by problem id"><label class="checks">'
        f'<input type="checkbox" name="wrong" value="1"{checked}> '
        'maj@k wrong only</label><button type="submit">Filter</button></form>'
    )
    ks = list(pass_k)
    headers = [("problem", ""), ("samples", "num"), ("correct", "num"), ("avg", "num")]
    headers += [(f"pass@{j}", "num") for j in ks] + [("maj", "num"), ("answers (votes)", "clusters")]
    body = []
    for p in rep.get("problems", []):
        pid = p["problem_id"]
        if (text and text.lower() not in pid.lower()) or (wrong and p.get("maj", 0) >= 1):
            continue
        trajs = [t for (q_id, _), t in sorted(samples.items()) if q_id == pid and t.error is None]
        cl = clusters_of(
            [t.info.get("answer") for t in trajs], [t.correct for t in trajs], [t.sample_index for t in trajs]
        )
        cells = "".join(_cluster_chip(c, c.votes == cl[0].votes) for c in cl[:5])
        cells += f' <span class="muted">+{len(cl) - 5}</span>' if len(cl) > 5 else ""
        link = f'<a class="mono" href="{href(base + "/problem", id=pid)}">{esc(pid)}</a>'
        body.append(
            [link, num(p.get("n")), num(p.get("correct")), num(p.get("avg"))]
            + [num((p.get("pass_at_k") or {}).get(j)) for j in ks]
            + [num(p.get("maj")), cells]
        )
    parts.append(table(headers, body))
    return layout.render(ev.name, "".join(parts), target=target, tab=tab)


def _cluster_chip(c: Any, top: bool) -> str:
    """An answer cluster as `answer ×votes ✓`; the most voted (maj@k's pick, ties included) outlined."""
    answer = f'<span class="mono">{esc(_short(c.answer))}</span>'
    return f'<span class="cl{" win" if top else ""}">{answer} ×{c.votes} {verdict(c.correct)}</span>'


def _short(v: Any, n: int = 40) -> str:
    s = str(v)
    return s if len(s) <= n else s[: n - 1] + "…"


def eval_problem_page(layout: Layout, base: str, ev: EvalDir, problem_id: str, target: int, tab: str) -> str:
    trajs = ev.problem_samples(problem_id)
    valid = [t for t in trajs if t.error is None]
    cl = clusters_of([t.info.get("answer") for t in valid], [t.correct for t in valid], [t.sample_index for t in valid])
    parts = [f'<h1 class="mono">{esc(problem_id)}</h1>', f'<p><a href="{href(base)}">← {esc(ev.name)}</a></p>']
    parts.append("<h2>Answer clusters</h2>")
    ch = [("answer", ""), ("votes", "num"), ("correct", ""), ("samples", "")]
    parts.append(
        table(
            ch,
            [
                [
                    f'<span class="mono">{esc(c.answer)}</span>',
                    num(c.votes),
                    verdict(c.correct),
                    ", ".join(str(s) for s in c.samples),
                ]
                for c in cl
            ],
        )
        if cl
        else '<p class="muted">No answer given.</p>'
    )
    parts.append("<h2>Samples</h2>")
    headers = [
        ("sample", "num"),
        ("answer", ""),
        ("reward", "num"),
        ("tool calls", "num"),
        ("tokens", "num"),
        ("ended", ""),
        ("", ""),
    ]
    body = []
    for t in trajs:
        ended = (
            "error: " + esc(t.error)
            if t.error
            else "terminated"
            if t.terminated
            else "truncated"
            if t.truncated
            else "—"
        )
        body.append(
            [
                num(t.sample_index),
                f'<span class="mono">{esc(t.info.get("answer"))}</span> {verdict(None if t.error else t.correct)}',
                num(t.reward, 2),
                num(len(t.tool_calls)),
                num(len(t.token_ids)),
                ended,
                f'<a class="traj-link" href="{href(base + "/sample", id=problem_id, i=t.sample_index)}">open</a>',
            ]
        )
    parts.append(table(headers, body))
    return layout.render(problem_id, "".join(parts), target=target, tab=tab)


def eval_sample_page(
    layout: Layout, base: str, ev: EvalDir, problem_id: str, index: int, target: int, tab: str
) -> str | None:
    from spo_agents.evaluation.rescore import completion_segments

    t = ev.samples().get((problem_id, index))
    if t is None:
        return None
    parts = [
        f'<h1><span class="mono">{esc(problem_id)}</span> · sample {index}</h1>',
        f'<p><a href="{href(base + "/problem", id=problem_id)}">← all samples of this problem</a></p>',
    ]
    parts.append(
        facts(
            [
                ("reward", num(t.reward, 2) + " " + verdict(None if t.error else t.correct)),
                ("answer", f'<span class="mono">{esc(t.info.get("answer"))}</span>'),
                ("check", esc(t.info.get("check"))),
                ("tool calls", num(len(t.tool_calls))),
                ("tokens", num(len(t.token_ids))),
                ("policy version", num(t.policy_version)),
                ("ended", "terminated" if t.terminated else "truncated" if t.truncated else "—"),
                ("env", esc(t.env_id)),
            ]
        )
    )
    if t.error:
        parts.append(f'<p class="notice">Infrastructure error: {esc(t.error)}</p>')
    completion = t.info.get("completion")
    if completion is None:
        parts.append('<p class="muted">This transcript has no decoded completion.</p>')
        return layout.render(problem_id, "".join(parts), target=target, tab=tab)
    calls = t.tool_calls
    convo, call = ['<div class="convo">'], 0
    for kind, text in completion_segments(completion, [c.output for c in calls]):
        if kind == "model":
            convo.append(_model_turn(_code_parts(text), '<span class="tag">sampled</span>'))
        else:
            tag = '<span class="tag">inserted</span>'
            if call < len(calls) and calls[call].output in text:
                c = calls[call]
                state, cls = ("ok", "good") if c.ok else ("timed out" if c.timed_out else "failed", "bad")
                tag += f' <span class="tag {cls}">tool call {call + 1}: {state} · {c.duration_s:.2f} s</span>'
                call += 1
            convo.append(_env_turn(text, tag))
    convo.append("</div>")
    parts.append(
        '<p class="muted small">Split into model text and environment replies from the decoded completion.</p>'
    )
    parts.extend(convo)
    return layout.render(f"{problem_id} #{index}", "".join(parts), target=target, tab=tab)


# --------------------------------------------------------------------------------------------
# Compare
# --------------------------------------------------------------------------------------------
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
