"""Inline SVG charts for the project page, drawn on the server.

The page must work with no build step and no external assets (no CDN: the backend often
runs where there is no internet), so the two charts it needs, a line chart and a bar per
label, are a few dozen SVG elements written here. matplotlib could draw them too, but as a
picture with baked-in fonts, several times heavier and without the hover titles.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from markupsafe import Markup, escape

COLOURS = ("#1f6feb", "#d9480f", "#2f9e44", "#7048e8", "#c2255c")


@dataclass
class Series:
    name: str
    points: list[tuple[float, float]]  # (x, y), in x order
    dashed: bool = False
    colour: str | None = None


@dataclass
class Guide:
    """A horizontal reference line, e.g. the kappa threshold."""

    y: float
    label: str


@dataclass
class LineChart:
    title: str
    x_label: str
    y_label: str
    series: list[Series]
    y_range: tuple[float, float] = (0.0, 1.0)
    x_range: tuple[float, float] | None = None  # default: the series' own; share it to align charts
    y_percent: bool = True
    guides: list[Guide] = field(default_factory=list)
    width: int = 600
    height: int = 260


def nice_ticks(low: float, high: float, most: int = 6) -> list[float]:
    """Round tick values (1, 2 or 5 times a power of ten apart) covering [low, high]."""
    if high <= low:
        high = low + 1
    raw = (high - low) / max(most - 1, 1)
    power = 10 ** math.floor(math.log10(raw))
    step = next(m * power for m in (1, 2, 5, 10) if m * power >= raw)
    first, last = math.floor(low / step + 1e-9), math.ceil(high / step - 1e-9)
    ticks = [round(i * step, 10) for i in range(first, last + 1)]
    return ticks


def line_chart(chart: LineChart) -> Markup:
    """The chart as an inline <svg>: axes with round ticks, one line per series with a dot
    per point (hover shows its values), guides as dotted lines, and a legend on top."""
    left, right, top, bottom = 52, 16, 34, 42
    plot_w, plot_h = chart.width - left - right, chart.height - top - bottom
    xs = [x for s in chart.series for x, _ in s.points] + list(chart.x_range or ())
    x_ticks = nice_ticks(min(xs, default=0), max(xs, default=1), most=7)
    x_low, x_high = x_ticks[0], x_ticks[-1]
    y_low, y_high = chart.y_range

    def px(x: float) -> float:
        return left + (x - x_low) / ((x_high - x_low) or 1) * plot_w

    def py(y: float) -> float:
        y = min(max(y, y_low), y_high)
        return top + (1 - (y - y_low) / ((y_high - y_low) or 1)) * plot_h

    def y_text(y: float) -> str:
        return f"{y:.0%}" if chart.y_percent else f"{y:g}"

    parts = [f'<svg class="chart" viewBox="0 0 {chart.width} {chart.height}" width="{chart.width}" '
             f'height="{chart.height}" role="img" aria-label="{escape(chart.title)}">',
             f'<title>{escape(chart.title)}</title>']
    for y in nice_ticks(y_low, y_high, most=6):
        if y_low <= y <= y_high:
            parts.append(f'<line x1="{left}" x2="{left + plot_w}" y1="{py(y):.1f}" y2="{py(y):.1f}" '
                         f'stroke="#e5e7eb"/>')
            parts.append(f'<text x="{left - 6}" y="{py(y) + 4:.1f}" text-anchor="end" class="tick">'
                         f'{y_text(y)}</text>')
    for x in x_ticks:
        parts.append(f'<line x1="{px(x):.1f}" x2="{px(x):.1f}" y1="{top + plot_h}" y2="{top + plot_h + 4}" '
                     f'stroke="#6b7280"/>')
        parts.append(f'<text x="{px(x):.1f}" y="{top + plot_h + 17}" text-anchor="middle" class="tick">'
                     f'{x:g}</text>')
    parts.append(f'<line x1="{left}" x2="{left + plot_w}" y1="{top + plot_h}" y2="{top + plot_h}" '
                 f'stroke="#6b7280"/>')
    parts.append(f'<text x="{left + plot_w / 2:.1f}" y="{chart.height - 6}" text-anchor="middle" '
                 f'class="axis">{escape(chart.x_label)}</text>')
    parts.append(f'<text transform="translate(13 {top + plot_h / 2:.1f}) rotate(-90)" '
                 f'text-anchor="middle" class="axis">{escape(chart.y_label)}</text>')
    for guide in chart.guides:
        parts.append(f'<line x1="{left}" x2="{left + plot_w}" y1="{py(guide.y):.1f}" y2="{py(guide.y):.1f}" '
                     f'stroke="#374151" stroke-dasharray="2 3"/>')
    legend_x = left
    for i, series in enumerate(chart.series):
        colour = series.colour or COLOURS[i % len(COLOURS)]
        dash = ' stroke-dasharray="6 4"' if series.dashed else ""
        if len(series.points) > 1:
            path = " ".join(f"{px(x):.1f},{py(y):.1f}" for x, y in series.points)
            parts.append(f'<polyline points="{path}" fill="none" stroke="{colour}" stroke-width="2"{dash}/>')
        for x, y in series.points:
            parts.append(f'<circle cx="{px(x):.1f}" cy="{py(y):.1f}" r="3.5" fill="{colour}">'
                         f'<title>{escape(series.name)}: {y_text(y)} at {x:g}</title></circle>')
        parts.append(f'<line x1="{legend_x}" x2="{legend_x + 18}" y1="14" y2="14" stroke="{colour}" '
                     f'stroke-width="2"{dash}/>')
        parts.append(f'<text x="{legend_x + 23}" y="18" class="legend">{escape(series.name)}</text>')
        legend_x += 30 + 6.4 * len(series.name)
    for guide in chart.guides:  # in the legend, not on the line: the data may run along it
        parts.append(f'<line x1="{legend_x}" x2="{legend_x + 18}" y1="14" y2="14" stroke="#374151" '
                     f'stroke-dasharray="2 3"/>')
        parts.append(f'<text x="{legend_x + 23}" y="18" class="legend">{escape(guide.label)}</text>')
        legend_x += 30 + 6.4 * len(guide.label)
    parts.append("</svg>")
    return Markup("".join(parts))


def label_mix_chart(rows: list[tuple[str, int, int]], width: int = 600) -> Markup:
    """One bar per label: its labeled tasks (solid) and the unlabeled tasks the model
    predicts as it (light), on one scale, with both numbers beside the bar."""
    row_h, name_w, number_w = 26, 130, 170
    height = row_h * len(rows) + 8
    bar_w = width - name_w - number_w
    biggest = max((labeled + predicted for _, labeled, predicted in rows), default=0) or 1
    parts = [f'<svg class="chart" viewBox="0 0 {width} {height}" width="{width}" height="{height}" '
             f'role="img" aria-label="labels: labeled and predicted"><title>labeled and predicted tasks '
             f'per label</title>']
    for i, (name, labeled, predicted) in enumerate(rows):
        y = 4 + i * row_h
        solid = labeled / biggest * bar_w
        light = predicted / biggest * bar_w
        parts.append(f'<text x="{name_w - 8}" y="{y + 16}" text-anchor="end" class="legend">'
                     f'{escape(name)}</text>')
        parts.append(f'<rect x="{name_w}" y="{y + 3}" width="{solid:.1f}" height="18" fill="#1f6feb">'
                     f'<title>{escape(name)}: {labeled} labeled</title></rect>')
        parts.append(f'<rect x="{name_w + solid:.1f}" y="{y + 3}" width="{light:.1f}" height="18" '
                     f'fill="#a5c8ff"><title>{escape(name)}: {predicted} predicted</title></rect>')
        parts.append(f'<text x="{name_w + bar_w + 8}" y="{y + 16}" class="tick">{labeled} labeled · '
                     f'{predicted} predicted</text>')
    parts.append("</svg>")
    return Markup("".join(parts))
