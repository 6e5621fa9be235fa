"""The viewer's HTML building blocks: escaping (`esc`) and URLs (`href`), numbers, tables, facts
and bars, the pager, the frame around every page (`Layout`), and the turns of a transcript.
Every value that comes from a run (model text, tool output, problem ids, answers, config values)
goes through `esc`; URLs are built with `href`."""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Sequence
from html import escape
from typing import Any
from urllib.parse import urlencode

from spo_agents.view.data import EvalDir, RunDir

PAGE_SIZE = 100
REFRESH_S = 10


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


def pager(base: str, page: int, pages: int, **params: Any) -> str:
    if pages <= 1:
        return ""
    prev = f'<a href="{href(base, page=page - 1, **params)}">← previous</a>' if page > 1 else ""
    nxt = f'<a href="{href(base, page=page + 1, **params)}">next →</a>' if page < pages else ""
    return f'<div class="pager">{prev}<span class="muted">page {page} of {pages}</span>{nxt}</div>'


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


def code_parts(text: str) -> list[list[str]]:
    """`<code>...</code>` blocks of a model text as code parts (for eval transcripts)."""
    out, pos = [], 0
    for m in re.finditer(r"(<code>)(.*?)(</code>)", text, re.DOTALL):
        out.append(["text", text[pos : m.start(2)]])
        out.append(["code", m.group(2)])
        pos = m.end(2)
    out.append(["text", text[pos:]])
    return [p for p in out if p[1]]


def model_turn(parts: list[list[str]], tags: str, tokens: str = "") -> str:
    inner = tokens or "".join(
        f'<pre class="code">{esc(t)}</pre>' if kind == "code" else f'<pre class="text">{esc(t)}</pre>'
        for kind, t in parts
    )
    return f'<div class="turn model"><div class="who">model {tags}</div>{inner}</div>'


def env_turn(text: str, tags: str) -> str:
    return f'<div class="turn env"><div class="who">environment {tags}</div><pre class="reply">{esc(text)}</pre></div>'
