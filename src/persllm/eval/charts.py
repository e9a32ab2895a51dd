"""Inline SVG charts written in Python (no JavaScript, no CDN): grouped bars with intervals, and radar charts."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from html import escape

PALETTE = ("#4269d0", "#efb118", "#ff725c", "#6cc5b0", "#3ca951", "#ff8ab7", "#a463f2", "#97bbf5", "#9c6b4e")
_FONT = 'font-family="system-ui, sans-serif"'

Interval = tuple[float, float] | None


def colors(names: Sequence[str]) -> dict[str, str]:
    """A stable colour per series name."""
    return {name: PALETTE[i % len(PALETTE)] for i, name in enumerate(names)}


def _fmt(value: float) -> str:
    return f"{value:.2f}".rstrip("0").rstrip(".") if abs(value) < 100 else f"{value:.0f}"


def bar_chart(title: str, categories: Sequence[str], series: Mapping[str, Sequence[float | None]],
              palette: dict[str, str], intervals: Mapping[str, Sequence[Interval]] | None = None,
              ymax: float | None = None, width: int = 640, height: int = 260) -> str:
    """Grouped vertical bars: one group per category, one bar per series; None values are drawn as 'n/a'."""
    left, right, top, bottom = 44, 12, 28, 58
    plot_w, plot_h = width - left - right, height - top - bottom
    values = [v for vs in series.values() for v in vs if v is not None]
    highs = [hi for ivs in (intervals or {}).values() for iv in ivs if iv is not None for hi in iv[1:]]
    top_value = ymax if ymax is not None else max(values + highs + [1e-9]) * 1.1
    scale = plot_h / top_value if top_value > 0 else 0.0
    parts = [(f'<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {width} {height}" width="{width}" '
              f'height="{height}" role="img" aria-label="{escape(title)}">'),
             f'<text x="{left}" y="16" {_FONT} font-size="13" font-weight="600">{escape(title)}</text>']
    for k in range(5):  # horizontal grid with labels
        y = top + plot_h - plot_h * k / 4
        parts.append(f'<line x1="{left}" x2="{width - right}" y1="{y:.1f}" y2="{y:.1f}" stroke="#ddd"/>')
        parts.append(f'<text x="{left - 4}" y="{y + 4:.1f}" {_FONT} font-size="10" text-anchor="end">'
                     f'{_fmt(top_value * k / 4)}</text>')
    group_w = plot_w / max(1, len(categories))
    bar_w = group_w * 0.8 / max(1, len(series))
    for c, category in enumerate(categories):
        x0 = left + c * group_w + group_w * 0.1
        for s, (name, vals) in enumerate(series.items()):
            x = x0 + s * bar_w
            value = vals[c] if c < len(vals) else None
            if value is None:
                parts.append(f'<text x="{x + bar_w / 2:.1f}" y="{top + plot_h - 4}" {_FONT} font-size="9" '
                             f'text-anchor="middle" fill="#888">n/a</text>')
                continue
            h = max(0.0, value * scale)
            parts.append(f'<rect x="{x:.1f}" y="{top + plot_h - h:.1f}" width="{bar_w * 0.92:.1f}" height="{h:.1f}" '
                         f'fill="{palette.get(name, "#888")}"><title>{escape(name)} · {escape(category)}: '
                         f'{_fmt(value)}</title></rect>')
            interval = (intervals or {}).get(name, [None] * len(categories))[c] if intervals else None
            if interval is not None:
                lo, hi = (top + plot_h - min(top_value, max(0.0, v)) * scale for v in interval)
                xm = x + bar_w * 0.46
                parts.append(f'<line x1="{xm:.1f}" x2="{xm:.1f}" y1="{lo:.1f}" y2="{hi:.1f}" stroke="#333"/>')
        parts.append(f'<text x="{x0 + group_w * 0.4:.1f}" y="{top + plot_h + 14}" {_FONT} font-size="11" '
                     f'text-anchor="middle">{escape(category)}</text>')
    parts.append(_legend(list(series), palette, left, height - 18))
    parts.append("</svg>")
    return "".join(parts)


def radar_chart(title: str, axes: Sequence[str], series: Mapping[str, Sequence[float | None]],
                palette: dict[str, str], low: float = 1.0, high: float = 5.0, dashed: Sequence[str] = (),
                size: int = 300) -> str:
    """A radar (spider) chart on a fixed low-high scale; `dashed` series (targets) are drawn as dashed outlines."""
    cx, cy, radius = size / 2, size / 2 + 6, size / 2 - 46
    height = size + 40

    def point(k: int, value: float) -> tuple[float, float]:
        angle = -math.pi / 2 + 2 * math.pi * k / len(axes)
        r = radius * (min(max(value, low), high) - low) / (high - low)
        return cx + r * math.cos(angle), cy + r * math.sin(angle)

    parts = [(f'<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {size} {height}" width="{size}" '
              f'height="{height}" role="img" aria-label="{escape(title)}">'),
             f'<text x="8" y="16" {_FONT} font-size="13" font-weight="600">{escape(title)}</text>']
    for ring in range(1, 5):
        level = low + (high - low) * ring / 4
        ring_points = " ".join(f"{x:.1f},{y:.1f}" for x, y in (point(k, level) for k in range(len(axes))))
        parts.append(f'<polygon points="{ring_points}" fill="none" stroke="#ddd"/>')
    for k, axis in enumerate(axes):
        x, y = point(k, high)
        parts.append(f'<line x1="{cx:.1f}" y1="{cy:.1f}" x2="{x:.1f}" y2="{y:.1f}" stroke="#ccc"/>')
        lx, ly = point(k, high + (high - low) * 0.12)
        parts.append(f'<text x="{lx:.1f}" y="{ly + 4:.1f}" {_FONT} font-size="11" text-anchor="middle">'
                     f'{escape(axis)}</text>')
    for name, values in series.items():
        if any(v is None for v in values):
            continue
        corners = (point(k, float(v)) for k, v in enumerate(values))  # type: ignore[arg-type]
        pts = " ".join(f"{x:.1f},{y:.1f}" for x, y in corners)
        colour = palette.get(name, "#888")
        style = 'stroke-dasharray="5 3" fill="none"' if name in dashed else f'fill="{colour}" fill-opacity="0.12"'
        parts.append(f'<polygon points="{pts}" stroke="{colour}" stroke-width="2" {style}>'
                     f'<title>{escape(name)}</title></polygon>')
    parts.append(_legend([n for n in series if all(v is not None for v in series[n])], palette, 8, height - 10))
    parts.append("</svg>")
    return "".join(parts)


def _legend(names: Sequence[str], palette: dict[str, str], x: float, y: float) -> str:
    parts, offset = [], 0.0
    for name in names:
        parts.append(f'<rect x="{x + offset:.1f}" y="{y - 9:.1f}" width="10" height="10" '
                     f'fill="{palette.get(name, "#888")}"/>')
        parts.append(f'<text x="{x + offset + 14:.1f}" y="{y:.1f}" {_FONT} font-size="11">{escape(name)}</text>')
        offset += 22 + 6.5 * len(name)
    return "".join(parts)
