"""The eval pages: a run's held-out evaluations, one eval dir (pass@k, maj@k, answer clusters per
problem), one problem's samples, and one sample's transcript."""

from __future__ import annotations

import re
from typing import Any
from urllib.parse import quote

from spo_agents.view.data import EvalDir, RunDir, clusters_of
from spo_agents.view.html import Layout, code_parts, env_turn, esc, facts, href, model_turn, num, table, verdict
from spo_agents.view.svg import Series, line_chart


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
            convo.append(model_turn(code_parts(text), '<span class="tag">sampled</span>'))
        else:
            tag = '<span class="tag">inserted</span>'
            if call < len(calls) and calls[call].output in text:
                c = calls[call]
                state, cls = ("ok", "good") if c.ok else ("timed out" if c.timed_out else "failed", "bad")
                tag += f' <span class="tag {cls}">tool call {call + 1}: {state} · {c.duration_s:.2f} s</span>'
                call += 1
            convo.append(env_turn(text, tag))
    convo.append("</div>")
    parts.append(
        '<p class="muted small">Split into model text and environment replies from the decoded completion.</p>'
    )
    parts.extend(convo)
    return layout.render(f"{problem_id} #{index}", "".join(parts), target=target, tab=tab)
