"""The problem pages: the tracker's table of a run's problems (sortable, filtered, paged) and one
problem's history (v_hat, reward, advantage and rho at every visit, with its saved trajectories)."""

from __future__ import annotations

import math

from spo_agents.view.data import ProblemRow, RunDir
from spo_agents.view.html import PAGE_SIZE, Layout, bar, esc, facts, href, num, pager, table, verdict
from spo_agents.view.svg import Series, line_chart

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
        pager(base, page, pages, q=text, visited="1" if visited else None, sort=sort, desc="1" if desc else "0")
    )
    return layout.render("problems", "".join(parts), target=i, tab="problems", live=run.live())


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
