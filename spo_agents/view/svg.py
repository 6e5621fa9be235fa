"""Line charts as inline SVG, written by hand (no JavaScript library, nothing fetched).

`line_chart` draws one or more series on shared axes: nice round ticks, a light grid, one
`<path class="series">` per series (a gap where a value is missing), markers with a `<title>`
tooltip when there are few points, and a legend. All text is escaped.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from html import escape

PALETTE = ("#3b6fd4", "#e8900c", "#d1495b", "#2a9d8f", "#7b5bd6", "#6a994e", "#c9559a", "#5c677d")


@dataclass
class Series:
    """Points (x, y) of one curve; y None is a gap."""

    label: str
    xs: Sequence[float]
    ys: Sequence[float | None]
    color: str | None = None
    dashed: bool = False


def nice_ticks(lo: float, hi: float, target: int = 5) -> list[float]:
    """Round tick values covering [lo, hi] (steps of 1, 2, 2.5 or 5 times a power of ten)."""
    if not (math.isfinite(lo) and math.isfinite(hi)):
        return [0.0]
    if hi <= lo:
        hi = lo + (abs(lo) or 1.0)
    raw = (hi - lo) / max(target, 1)
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw)
    start = math.floor(lo / step) * step
    ticks = []
    v = start
    while v <= hi + step * 1e-9:
        ticks.append(round(v, 12))
        v += step
    if ticks[0] > lo:
        ticks.insert(0, ticks[0] - step)
    if ticks[-1] < hi:
        ticks.append(ticks[-1] + step)
    return ticks


def fmt(v: float, step: float | None = None) -> str:
    """A short label for a value, or for a tick `step` apart from its neighbours (as many
    decimals as the step needs)."""
    if v == 0:
        return "0"
    if step is not None and step > 0 and 1e-6 <= abs(v) < 1e6:
        decimals = max(0, -math.floor(math.log10(step) + 1e-9))
        scaled = step * 10**decimals
        decimals += 1 if abs(scaled - round(scaled)) > 1e-6 else 0  # 2.5, 0.25, ...
        return f"{v:,.{decimals}f}"
    a = abs(v)
    if a >= 1e5 or a < 1e-3:
        return f"{v:.2g}"
    if a >= 100:
        return f"{v:,.0f}"
    return f"{v:.3g}"


def _axes(pts: list[tuple[float, float]], y_range: tuple[float, float] | None) -> tuple[list[float], list[float]]:
    """Tick values of the x and y axes for the points (the axes span the outer ticks)."""
    if not pts:
        return [0.0, 1.0], [0.0, 1.0]
    x0, x1 = min(p[0] for p in pts), max(p[0] for p in pts)
    if x1 == x0:
        x0, x1 = x0 - 1, x1 + 1
    y0, y1 = min(p[1] for p in pts), max(p[1] for p in pts)
    if y_range is not None:  # the fixed range, widened when the data leave it
        y0, y1 = min(y0, y_range[0]), max(y1, y_range[1])
    span = max(abs(y0), abs(y1)) * 1e-3  # a nearly flat line is drawn flat, not as noise in the 7th digit
    if y_range is None and y1 - y0 < span:
        mid = (y0 + y1) / 2
        y0, y1 = mid - span / 2, mid + span / 2
    if y_range is None and y1 - y0 < 1e-12:  # zeros: 0 to 1
        y0, y1 = 0.0, 1.0
    return nice_ticks(x0, x1, 6), nice_ticks(y0, y1, 4)


def _step(ticks: list[float]) -> float | None:
    return ticks[1] - ticks[0] if len(ticks) > 1 else None


def _legend(series: Sequence[Series], left: int, width: int) -> list[tuple[int, float, int, str]]:
    """(series index, x, row, label) of each legend entry, flowed left to right in rows."""
    out, x, row = [], 0.0, 0
    for n, s in enumerate(series):
        label = s.label if any(y is not None for y in s.ys) else f"{s.label} (no data)"
        label = label if len(label) <= 48 else label[:47] + "…"
        w = 16 + 6.3 * len(label) + 14
        if x > 0 and x + w > width:
            x, row = 0.0, row + 1
        out.append((n, left + x, row, label))
        x += w
    return out


def line_chart(
    series: Sequence[Series],
    *,
    title: str = "",
    width: int = 600,
    height: int = 250,
    x_label: str = "step",
    y_range: tuple[float, float] | None = None,
    chart_id: str = "",
) -> str:
    """An SVG line chart of `series` (empty series are listed in the legend as `no data`)."""
    pts = [(x, y) for s in series for x, y in zip(s.xs, s.ys) if y is not None and math.isfinite(y)]
    xt, yt = _axes(pts, y_range)
    xstep, ystep = _step(xt), _step(yt)
    labels = [fmt(t, ystep) for t in yt]
    right, top, bottom = 14, 30, 40
    left = max(44, 12 + round(6.4 * max((len(lb) for lb in labels), default=1)))
    pw = width - left - right
    legend = _legend(series, left, pw) if len(series) > 1 else []
    legend_rows = max((row for _, _, row, _ in legend), default=-1) + 1
    top += 16 * legend_rows
    ph = height + 16 * legend_rows - top - bottom
    out = [
        f'<svg class="chart" id="{escape(chart_id)}" viewBox="0 0 {width} {height + 16 * legend_rows}" '
        f'width="{width}" height="{height + 16 * legend_rows}" role="img" aria-label="{escape(title)}">',
        f'<text class="chart-title" x="{left}" y="16">{escape(title)}</text>',
    ]
    for n, lx, row, label in legend:
        ly = 34 + 16 * row
        color = series[n].color or PALETTE[n % len(PALETTE)]
        out.append(f'<rect x="{lx}" y="{ly - 8}" width="12" height="3" fill="{color}"/>')
        out.append(f'<text class="legend" x="{lx + 16}" y="{ly - 4}">{escape(label)}</text>')
    if not pts:
        out.append(
            f'<text class="empty" x="{left + pw / 2}" y="{top + ph / 2}" text-anchor="middle">no data yet</text></svg>'
        )
        return "".join(out)
    x0, x1 = xt[0], xt[-1]
    y0, y1 = yt[0], yt[-1]

    def sx(x: float) -> float:
        return left + (x - x0) / (x1 - x0) * pw

    def sy(y: float) -> float:
        return top + ph - (y - y0) / (y1 - y0) * ph

    for t in yt:
        if y0 - 1e-12 <= t <= y1 + 1e-12:
            out.append(f'<line class="grid" x1="{left}" x2="{left + pw}" y1="{sy(t):.1f}" y2="{sy(t):.1f}"/>')
            out.append(
                f'<text class="tick" x="{left - 6}" y="{sy(t) + 4:.1f}" text-anchor="end">{fmt(t, ystep)}</text>'
            )
    for t in xt:
        if x0 - 1e-12 <= t <= x1 + 1e-12:
            out.append(
                f'<line class="tickmark" x1="{sx(t):.1f}" x2="{sx(t):.1f}" y1="{top + ph}" y2="{top + ph + 4}"/>'
            )
            out.append(
                f'<text class="tick" x="{sx(t):.1f}" y="{top + ph + 16}" text-anchor="middle">{fmt(t, xstep)}</text>'
            )
    out.append(f'<line class="axis" x1="{left}" x2="{left + pw}" y1="{top + ph}" y2="{top + ph}"/>')
    ly = height + 16 * legend_rows - 6
    out.append(f'<text class="axis-label" x="{left + pw / 2}" y="{ly}" text-anchor="middle">{escape(x_label)}</text>')
    for n, s in enumerate(series):
        color = s.color or PALETTE[n % len(PALETTE)]
        d, pen = [], "M"
        marks = []
        for x, y in zip(s.xs, s.ys):
            if y is None or not math.isfinite(y):
                pen = "M"
                continue
            d.append(f"{pen}{sx(x):.1f},{sy(y):.1f}")
            pen = "L"
            marks.append((x, y))
        if not d:
            continue
        dash = ' stroke-dasharray="5 3"' if s.dashed else ""
        out.append(f'<path class="series" data-label="{escape(s.label)}" d="{" ".join(d)}" stroke="{color}"{dash}/>')
        if len(marks) <= 60:
            for x, y in marks:
                out.append(
                    f'<circle class="point" cx="{sx(x):.1f}" cy="{sy(y):.1f}" r="2.6" fill="{color}">'
                    f"<title>{escape(s.label)}: {fmt(y)} at {escape(x_label)} {fmt(x)}</title></circle>"
                )
    out.append("</svg>")
    return "".join(out)
