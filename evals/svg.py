"""Small inline-SVG plots for the HTML report (no plotting library, no network, no scripts).

Every piece of text that reaches the SVG goes through `esc`, because labels can be question ids or run names
chosen by users and must never become markup.
"""

from __future__ import annotations

import html
import math
from collections.abc import Sequence
from dataclasses import dataclass

PALETTE = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#e377c2", "#17becf", "#7f7f7f")


def esc(text: object) -> str:
    return html.escape(str(text), quote=True)


def color(i: int) -> str:
    return PALETTE[i % len(PALETTE)]


def _fmt(v: float) -> str:
    return f"{v:.1f}"


@dataclass(frozen=True)
class Bar:
    group: str
    series: int
    value: float | None
    low: float | None = None
    high: float | None = None
    note: str = ""


def bar_chart_h(
    groups: Sequence[str],
    series: Sequence[str],
    bars: Sequence[Bar],
    title: str,
    x_label: str,
    x_max: float = 1.0,
) -> str:
    """Horizontal grouped bars (one group per question, one bar per run) with CI whiskers, x in [0, x_max]."""
    left, right, top, row_h, bar_h = 230, 30, 40, 8 + 14 * max(1, len(series)), 12
    width = 760
    plot_w = width - left - right
    height = top + row_h * len(groups) + 50
    x_max = x_max or 1.0

    def sx(v: float) -> float:
        return left + plot_w * min(max(v, 0.0), x_max) / x_max

    out = [_open(width, height, title)]
    for t in range(6):
        v = x_max * t / 5
        x = sx(v)
        out.append(f'<line x1="{_fmt(x)}" y1="{top - 5}" x2="{_fmt(x)}" y2="{height - 45}" stroke="#ddd"/>')
        out.append(
            f'<text x="{_fmt(x)}" y="{height - 30}" text-anchor="middle" font-size="11">{v:.0%}</text>'
        )
    out.append(
        f'<text x="{left + plot_w / 2}" y="{height - 10}" text-anchor="middle" font-size="12">{esc(x_label)}</text>'
    )
    index = {g: i for i, g in enumerate(groups)}
    for g, i in index.items():
        y = top + row_h * i + row_h / 2
        label = g if len(g) <= 34 else g[:31] + "..."
        out.append(
            f'<text x="{left - 8}" y="{_fmt(y + 4)}" text-anchor="end" font-size="11">{esc(label)}<title>{esc(g)}</title></text>'
        )
    for b in bars:
        if b.group not in index:
            continue
        y = top + row_h * index[b.group] + 4 + 14 * b.series
        tip = (
            f"{series[b.series]} / {b.group}: "
            + ("n/a" if b.value is None else f"{b.value:.1%}")
            + (f" {b.note}" if b.note else "")
        )
        if b.value is None:
            out.append(
                f'<text x="{left + 4}" y="{y + 10}" font-size="10" fill="#999">n/a<title>{esc(tip)}</title></text>'
            )
            continue
        out.append(
            f'<rect x="{left}" y="{y}" width="{_fmt(sx(b.value) - left)}" height="{bar_h}" fill="{color(b.series)}" '
            f'fill-opacity="0.75"><title>{esc(tip)}</title></rect>'
        )
        if b.low is not None and b.high is not None:
            cy = y + bar_h / 2
            out.append(
                f'<line x1="{_fmt(sx(b.low))}" y1="{cy}" x2="{_fmt(sx(b.high))}" y2="{cy}" stroke="#222"/>'
            )
            for v in (b.low, b.high):
                out.append(
                    f'<line x1="{_fmt(sx(v))}" y1="{cy - 4}" x2="{_fmt(sx(v))}" y2="{cy + 4}" stroke="#222"/>'
                )
    out.append(_legend(series, left, 22))
    out.append("</svg>")
    return "\n".join(out)


def scatter_panel(
    points: Sequence[tuple[float, float]],
    title: str,
    x_label: str,
    y_label: str,
    series_index: int = 0,
    x_line: float | None = None,
    y_line: float | None = None,
    shade: tuple[float, float, float, float] | None = None,
    size: int = 300,
) -> str:
    """One 0-100 x 0-100 scatter panel; `shade` = (x0, x1, y0, y1) marks a region (the misaligned corner)."""
    pad = 40
    inner = size - pad - 12

    def sx(v: float) -> float:
        return pad + inner * v / 100.0

    def sy(v: float) -> float:
        return 12 + inner * (1 - v / 100.0)

    out = [_open(size, size + 10, title)]
    out.append(f'<rect x="{pad}" y="12" width="{inner}" height="{inner}" fill="none" stroke="#999"/>')
    if shade:
        x0, x1, y0, y1 = shade
        out.append(
            f'<rect x="{_fmt(sx(x0))}" y="{_fmt(sy(y1))}" width="{_fmt(sx(x1) - sx(x0))}" '
            f'height="{_fmt(sy(y0) - sy(y1))}" fill="#d62728" fill-opacity="0.08"/>'
        )
    if x_line is not None:
        out.append(
            f'<line x1="{_fmt(sx(x_line))}" y1="12" x2="{_fmt(sx(x_line))}" y2="{12 + inner}" stroke="#d62728" stroke-dasharray="4 3"/>'
        )
    if y_line is not None:
        out.append(
            f'<line x1="{pad}" y1="{_fmt(sy(y_line))}" x2="{pad + inner}" y2="{_fmt(sy(y_line))}" stroke="#d62728" stroke-dasharray="4 3"/>'
        )
    for t in (0, 50, 100):
        out.append(f'<text x="{_fmt(sx(t))}" y="{inner + 26}" text-anchor="middle" font-size="10">{t}</text>')
        out.append(f'<text x="{pad - 4}" y="{_fmt(sy(t) + 3)}" text-anchor="end" font-size="10">{t}</text>')
    c = color(series_index)
    for x, y in points:
        out.append(f'<circle cx="{_fmt(sx(x))}" cy="{_fmt(sy(y))}" r="2" fill="{c}" fill-opacity="0.45"/>')
    out.append(
        f'<text x="{pad + inner / 2}" y="{size + 6}" text-anchor="middle" font-size="11">{esc(x_label)}</text>'
    )
    out.append(
        f'<text x="12" y="{12 + inner / 2}" text-anchor="middle" font-size="11" '
        f'transform="rotate(-90 12 {12 + inner / 2})">{esc(y_label)}</text>'
    )
    out.append("</svg>")
    return "\n".join(out)


@dataclass(frozen=True)
class RunPoint:
    label: str
    x: float
    y: float
    y_low: float | None = None
    y_high: float | None = None
    x_low: float | None = None
    x_high: float | None = None


def tradeoff_plot(
    points: Sequence[RunPoint],
    title: str,
    x_label: str,
    y_label: str,
    x_percent: bool = True,
    curves: Sequence[Sequence[str]] = (),
) -> str:
    """Task metric (x) against misaligned rate (y), one labelled point per run, CI whiskers. y is a rate;
    x is a rate in [0, 1] when `x_percent`, else any number (e.g. a loss), on an axis fitted to the points.
    Each of `curves` (run labels, in order) is drawn as a dashed line through its points: a sweep's
    trade-off curve."""
    width, height, left, bottom, top, right = 560, 380, 60, 50, 30, 150
    pw, ph = width - left - right, height - top - bottom
    y_max = min(1.0, max([0.05] + [p.y_high or p.y for p in points]) * 1.1)
    x_lo, x_hi = 0.0, 1.0
    if not x_percent:
        xs = [v for p in points for v in (p.x, p.x_low, p.x_high) if v is not None]
        spread = max(xs) - min(xs)
        pad = spread * 0.1 if spread > 0 else max(1e-6, abs(xs[0]) * 0.01)
        x_lo, x_hi = min(xs) - pad, max(xs) + pad

    def sx(v: float) -> float:
        return left + pw * (min(max(v, x_lo), x_hi) - x_lo) / (x_hi - x_lo)

    def sy(v: float) -> float:
        return top + ph * (1 - min(max(v, 0.0), y_max) / y_max)

    out = [_open(width, height, title)]
    out.append(f'<rect x="{left}" y="{top}" width="{pw}" height="{ph}" fill="none" stroke="#999"/>')
    decimals = max(0, min(6, 1 - math.floor(math.log10((x_hi - x_lo) / 5))))
    for t in range(6):
        xv, yv = x_lo + (x_hi - x_lo) * t / 5, y_max * t / 5
        tick = f"{xv:.0%}" if x_percent else f"{xv:.{decimals}f}"
        out.append(
            f'<text x="{_fmt(sx(xv))}" y="{top + ph + 16}" text-anchor="middle" font-size="10">{tick}</text>'
        )
        out.append(
            f'<text x="{left - 6}" y="{_fmt(sy(yv) + 3)}" text-anchor="end" font-size="10">{yv:.1%}</text>'
        )
    at = {p.label: p for p in points}
    for curve in curves:
        xy = [(sx(at[name].x), sy(at[name].y)) for name in curve if name in at]
        if len(xy) >= 2:
            path = " ".join(f"{_fmt(x)},{_fmt(y)}" for x, y in xy)
            out.append(f'<polyline points="{path}" fill="none" stroke="#888" stroke-dasharray="4 3"/>')
    for i, p in enumerate(points):
        c = color(i)
        if p.y_low is not None and p.y_high is not None:
            out.append(
                f'<line x1="{_fmt(sx(p.x))}" y1="{_fmt(sy(p.y_low))}" x2="{_fmt(sx(p.x))}" y2="{_fmt(sy(p.y_high))}" stroke="{c}"/>'
            )
        if p.x_low is not None and p.x_high is not None:
            out.append(
                f'<line x1="{_fmt(sx(p.x_low))}" y1="{_fmt(sy(p.y))}" x2="{_fmt(sx(p.x_high))}" y2="{_fmt(sy(p.y))}" stroke="{c}"/>'
            )
        x_text = f"{p.x:.1%}" if x_percent else f"{p.x:.4g}"
        tip = f"{p.label}: {x_label} {x_text}, {y_label} {p.y:.2%}"
        out.append(
            f'<circle cx="{_fmt(sx(p.x))}" cy="{_fmt(sy(p.y))}" r="5" fill="{c}"><title>{esc(tip)}</title></circle>'
        )
        out.append(
            f'<text x="{_fmt(sx(p.x) + 8)}" y="{_fmt(sy(p.y) - 6)}" font-size="11" fill="{c}">{esc(p.label[:40])}</text>'
        )
    out.append(
        f'<text x="{left + pw / 2}" y="{height - 12}" text-anchor="middle" font-size="12">{esc(x_label)}</text>'
    )
    out.append(
        f'<text x="14" y="{top + ph / 2}" text-anchor="middle" font-size="12" '
        f'transform="rotate(-90 14 {top + ph / 2})">{esc(y_label)}</text>'
    )
    out.append("</svg>")
    return "\n".join(out)


def _open(width: int, height: int, title: str) -> str:
    return (
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
        f'viewBox="0 0 {width} {height}" font-family="sans-serif" role="img">'
        f"<title>{esc(title)}</title>"
    )


def _legend(series: Sequence[str], x: int, y: int) -> str:
    parts = []
    cx = x
    for i, name in enumerate(series):
        label = name if len(name) <= 28 else name[:25] + "..."
        parts.append(f'<rect x="{cx}" y="{y - 10}" width="10" height="10" fill="{color(i)}"/>')
        parts.append(f'<text x="{cx + 14}" y="{y}" font-size="11">{esc(label)}</text>')
        cx += 24 + 7 * len(label)
    return "\n".join(parts)
