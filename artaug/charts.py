"""Charts as small SVG documents (no plotting library, a few kilobytes each): the report's histograms,
loss curves and bars, and the evaluation's intervals and win rates. The one chart engine.

A NaN or infinite value is never drawn (it has no place on an axis): histograms and curves leave it
out and count it in the legend as "n/a", intervals show "no data", bars and win shares draw 0.
"""

from __future__ import annotations

import math
from html import escape

WIDTH, HEIGHT, PAD = 360, 180, 32
COLOURS = ("#4c72b0", "#dd8452", "#55a868", "#c44e52", "#8172b3")


def _frame(title: str, body: str, legend: list[str]) -> str:
    keys = "".join(
        f'<rect x="{PAD + i * 110}" y="6" width="10" height="10" fill="{COLOURS[i % len(COLOURS)]}"/>'
        f'<text x="{PAD + 14 + i * 110}" y="15" font-size="11">{escape(name)}</text>'
        for i, name in enumerate(legend)
    )
    return _svg(title, WIDTH, HEIGHT, keys + body)


def _scale(low: float, high: float, start: float, end: float):
    span = (high - low) or 1.0
    return lambda v: start + (v - low) / span * (end - start)


def _axes(x_low: float, x_high: float, y_low: float, y_high: float) -> str:
    bottom, right = HEIGHT - PAD + 8, WIDTH - 8
    return (
        f'<line x1="{PAD}" y1="{bottom}" x2="{right}" y2="{bottom}" stroke="#888"/>'
        f'<line x1="{PAD}" y1="24" x2="{PAD}" y2="{bottom}" stroke="#888"/>'
        f'<text x="{PAD}" y="{HEIGHT - 4}" font-size="10">{x_low:.3g}</text>'
        f'<text x="{right}" y="{HEIGHT - 4}" font-size="10" text-anchor="end">{x_high:.3g}</text>'
        f'<text x="2" y="{bottom}" font-size="10">{y_low:.3g}</text>'
        f'<text x="2" y="32" font-size="10">{y_high:.3g}</text>'
    )


def _finite(value) -> bool:
    return isinstance(value, int | float) and math.isfinite(value)


def _legend(name: str, values: list, kept: list) -> str:
    return name if len(kept) == len(values) else f"{name} ({len(values) - len(kept)} n/a)"


def histogram(title: str, series: dict[str, list[float]], bins: int = 12) -> str:
    """Overlaid histograms of several series on shared bins."""
    series = {
        _legend(name, vs, ks): ks for name, vs in series.items() for ks in [[v for v in vs if _finite(v)]]
    }
    values = [v for vs in series.values() for v in vs]
    if not values:
        return _frame(title, '<text x="40" y="90" font-size="12">no data</text>', [])
    low, high = min(values), max(values)
    width = (high - low) / bins or 1.0
    counts = {
        name: [sum(1 for v in vs if min(int((v - low) / width), bins - 1) == b) for b in range(bins)]
        for name, vs in series.items()
    }
    top = max(max(c) for c in counts.values()) or 1
    x = _scale(0, bins, PAD, WIDTH - 8)
    y = _scale(0, top, HEIGHT - PAD + 8, 24)
    bars = "".join(
        f'<rect x="{x(b):.1f}" y="{y(n):.1f}" width="{x(b + 1) - x(b):.1f}" height="{y(0) - y(n):.1f}"'
        f' fill="{COLOURS[i % len(COLOURS)]}" fill-opacity="0.5"/>'
        for i, c in enumerate(counts.values())
        for b, n in enumerate(c)
        if n
    )
    return _frame(title, _axes(low, high, 0, top) + bars, list(series))


def lines(title: str, series: dict[str, list[tuple[float, float]]]) -> str:
    """One polyline per series of (x, y) points."""
    series = {
        _legend(name, ps, ks): ks
        for name, ps in series.items()
        for ks in [[p for p in ps if _finite(p[0]) and _finite(p[1])]]
    }
    points = [p for ps in series.values() for p in ps]
    if not points:
        return _frame(title, '<text x="40" y="90" font-size="12">no data</text>', [])
    xs, ys = [p[0] for p in points], [p[1] for p in points]
    x = _scale(min(xs), max(xs), PAD, WIDTH - 8)
    y = _scale(min(ys), max(ys), HEIGHT - PAD + 8, 24)
    body = "".join(
        f'<polyline fill="none" stroke="{COLOURS[i % len(COLOURS)]}" stroke-width="1.5" points="'
        + " ".join(f"{x(a):.1f},{y(b):.1f}" for a, b in ps)
        + '"/>'
        for i, ps in enumerate(series.values())
    )
    return _frame(title, _axes(min(xs), max(xs), min(ys), max(ys)) + body, list(series))


def bars(title: str, counts: dict[str, float]) -> str:
    """Horizontal bars, one per label (a non-finite count is drawn as 0)."""
    counts = {label: v if _finite(v) else 0 for label, v in counts.items()}
    top = max(counts.values(), default=0) or 1
    x = _scale(0, top, 120, WIDTH - 40)
    step = (HEIGHT - 30) / max(len(counts), 1)
    body = "".join(
        f'<text x="4" y="{30 + i * step + step / 2:.1f}" font-size="11">{escape(label)}</text>'
        f'<rect x="120" y="{26 + i * step:.1f}" width="{x(v) - 120:.1f}" height="{step * 0.7:.1f}"'
        f' fill="{COLOURS[i % len(COLOURS)]}"/>'
        f'<text x="{x(v) + 4:.1f}" y="{30 + i * step + step / 2:.1f}" font-size="11">{v:g}</text>'
        for i, (label, v) in enumerate(counts.items())
    )
    return _frame(title, body, [])


SERIES = {"base": COLOURS[0], "lora": COLOURS[1], "win": COLOURS[2], "tie": "#bbbbbb", "loss": COLOURS[3]}
ROW, LABEL, WIDE = 28, 190, 720


def intervals(
    title: str, note: str, items: list[tuple[str, str, float | None, list | None]], group: int = 0
) -> str:
    """One dot with its interval per (label, series, value, [low, high]).

    All rows share one axis with a zero line, or with `group` each run of that many rows gets its own
    axis (scores of different scales: the base and LoRA rows of one score side by side).
    """
    height = 56 + len(items) * ROW + 24
    size = group or len(items) or 1
    body = [f'<text x="8" y="16" font-size="13">{escape(title)}</text>',
            f'<text x="8" y="32" font-size="11" fill="#555">{escape(note)}</text>']  # fmt: skip
    items = [
        (label, series, value if _finite(value) else None, ci if ci and all(map(_finite, ci)) else None)
        for label, series, value, ci in items
    ]
    for first in range(0, len(items), size):
        block = items[first : first + size]
        points = [v for _, _, value, ci in block for v in ([value] + (ci or [])) if v is not None]
        points += [] if group and points else [0.0]
        low, high = min(points), max(points)
        pad = (high - low) * 0.08 or abs(high) * 0.1 or 1.0
        x = _scale(low - pad, high + pad, LABEL, WIDE - 110)
        top, bottom = 44 + first * ROW, 48 + (first + len(block)) * ROW
        if not group:
            body.append(_line(x(0), top, x(0), bottom, "#ddd", 2))
        # A shared axis is labelled under its rows; a block's own axis just above its first row, so
        # the range reads as its block's, not the next one's.
        label_y = top + 7 if group else bottom + 10
        body.append(f'<text x="{LABEL}" y="{label_y}" font-size="9" fill="#888">{low - pad:.3g}</text>'
                    f'<text x="{WIDE - 110}" y="{label_y}" font-size="9" fill="#888" text-anchor="end">'
                    f"{high + pad:.3g}</text>")  # fmt: skip
        for offset, (label, series, value, ci) in enumerate(block):
            y = 48 + (first + offset) * ROW + ROW // 2
            colour = SERIES.get(series, COLOURS[0])
            body.append(f'<text x="8" y="{y + 4}" font-size="11">{escape(label[:30])}</text>')
            if value is None:
                body.append(f'<text x="{LABEL}" y="{y + 4}" font-size="11">no data</text>')
                continue
            if ci:
                body.append(_line(x(ci[0]), y, x(ci[1]), y, colour, 3))
            body.append(f'<circle cx="{x(value):.1f}" cy="{y}" r="5" fill="{colour}"/>'
                        f'<text x="{WIDE - 100}" y="{y + 4}" font-size="11">{value:.4g}</text>')  # fmt: skip
    return _svg(title, WIDE, height, "".join(body))


def win_rates(title: str, rates: dict, note: str) -> str:
    """A stacked bar of win / tie / loss shares of judged prompts (missing ones counted, not drawn)."""
    left, right, y = LABEL, WIDE - 20, 44
    body = [f'<text x="8" y="16" font-size="13">{escape(title)}</text>',
            f'<text x="8" y="32" font-size="11" fill="#555">{escape(note)}</text>',
            f'<text x="8" y="{y + 16}" font-size="11">judged {rates.get("judged", 0)}, missing '
            f'{rates.get("missing", 0)}</text>']  # fmt: skip
    x = left
    for name in ("win", "tie", "loss"):
        share = rates.get(f"{name}_rate")
        share = share if _finite(share) else 0.0
        width = share * (right - left)
        body.append(f'<rect x="{x:.1f}" y="{y}" width="{width:.1f}" height="22" fill="{SERIES[name]}"/>')
        if share >= 0.08:
            body.append(
                f'<text x="{x + 4:.1f}" y="{y + 15}" font-size="11" fill="white">{name} {share:.0%}</text>'
            )
        x += width
    return _svg(title, WIDE, y + 40, "".join(body))


def _line(x1: float, y1: float, x2: float, y2: float, colour: str, width: int) -> str:
    return f'<line x1="{x1:.1f}" y1="{y1}" x2="{x2:.1f}" y2="{y2}" stroke="{colour}" stroke-width="{width}"/>'


def _svg(title: str, width: int, height: int, body: str) -> str:
    return (
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" role="img"'
        f' aria-label="{escape(title)}"><title>{escape(title)}</title>{body}</svg>'
    )
