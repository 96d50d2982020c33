"""Small inline SVG charts for the HTML report: no plotting library, a few kilobytes each."""

from __future__ import annotations

from html import escape

WIDTH, HEIGHT, PAD = 360, 180, 32
COLOURS = ("#4c72b0", "#dd8452", "#55a868", "#c44e52", "#8172b3")


def _frame(title: str, body: str, legend: list[str]) -> str:
    keys = "".join(
        f'<rect x="{PAD + i * 110}" y="6" width="10" height="10" fill="{COLOURS[i % len(COLOURS)]}"/>'
        f'<text x="{PAD + 14 + i * 110}" y="15" font-size="11">{escape(name)}</text>'
        for i, name in enumerate(legend)
    )
    return (
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{HEIGHT}" role="img"'
        f' aria-label="{escape(title)}"><title>{escape(title)}</title>{keys}{body}</svg>'
    )


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


def histogram(title: str, series: dict[str, list[float]], bins: int = 12) -> str:
    """Overlaid histograms of several series on shared bins."""
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
    """Horizontal bars, one per label."""
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
