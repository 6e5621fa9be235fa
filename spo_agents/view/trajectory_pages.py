"""The training-trajectory pages: the trajectories a step kept, and one trajectory as a
conversation of trained (model) and untrained (environment) turns, optionally shaded by each
token's log-prob."""

from __future__ import annotations

import math

from spo_agents.view.data import RunDir
from spo_agents.view.html import Layout, env_turn, esc, facts, href, model_turn, num, table, verdict


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
            convo.append(model_turn(parts_, tags, tokens))
        else:
            tag = f'<span class="tag">not trained · {len(seg.tokens):,} tokens</span>'
            if seg.tool_call is not None and seg.tool_call < len(calls):
                c = calls[seg.tool_call]
                state = "ok" if c.get("ok") else "timed out" if c.get("timed_out") else "failed"
                cls = "good" if c.get("ok") else "bad"
                took = f"{c.get('duration_s', 0.0):.2f} s"
                tag += f' <span class="tag {cls}">tool call {seg.tool_call + 1}: {state} · {took}</span>'
            convo.append(env_turn(seg.text if seg.text is not None else f"(token ids) {seg.tokens}", tag))
    convo.append("</div>")
    parts.extend(convo)
    return layout.render(f"step {step} #{index}", "".join(parts), target=i, tab="trajectories")


def _lp_class(lp: float) -> str:
    p = math.exp(lp) if math.isfinite(lp) else 0.0
    return f"lp{min(7, int((1.0 - p) * 8))}"


def _tokens(pieces: list[str], logprobs: list[float]) -> str:
    return "".join(
        f'<span class="tok {_lp_class(lp)}" title="log p = {lp:.3f}">{esc(piece)}</span>'
        for piece, lp in zip(pieces, logprobs)
    )
