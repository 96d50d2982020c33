"""Evaluation charts drawn with PIL (matplotlib is not a dependency): means with confidence
intervals, paired differences, and the MLLM judge's win / tie / loss shares."""

from __future__ import annotations

import io

from PIL import Image, ImageDraw

COLOURS = {"base": (120, 144, 176), "lora": (222, 126, 62), "win": (70, 160, 90), "tie": (190, 190, 190),
           "loss": (200, 80, 80), "ink": (30, 30, 30), "grid": (225, 225, 225)}  # fmt: skip
ROW, LABEL, WIDTH = 34, 190, 760


def _canvas(title: str, rows: int, note: str = "") -> tuple[Image.Image, ImageDraw.ImageDraw]:
    image = Image.new("RGB", (WIDTH, 70 + rows * ROW + 30), "white")
    draw = ImageDraw.Draw(image)
    draw.text((10, 8), title, fill=COLOURS["ink"])
    if note:
        draw.text((10, 24), note, fill=COLOURS["ink"])
    return image, draw


def _x(value: float, low: float, high: float) -> float:
    span = (high - low) or 1.0
    return LABEL + (value - low) / span * (WIDTH - LABEL - 150)  # the right margin holds the values


def _range(items, with_zero: bool = True) -> tuple[float, float]:
    points = [v for _, _, v, ci in items for v in ([v] + (ci or [])) if v is not None]
    points += [0.0] if with_zero or not points else []
    low, high = min(points), max(points)
    pad = (high - low) * 0.08 or abs(high) * 0.1 or 1.0
    return low - pad, high + pad


def interval_chart(title: str, note: str, items: list[tuple[str, str, float, list | None]],
                   group: int = 0) -> Image.Image:  # fmt: skip
    """One dot with an interval per (label, colour key, value, [low, high]).

    All rows share one axis (with its zero line), or with `group` each run of that many rows gets
    its own axis (scores of different scales: the base and LoRA rows of one score side by side).
    """
    image, draw = _canvas(title, len(items), note)
    size = group or len(items)
    for first in range(0, len(items), size):
        block = items[first : first + size]
        low, high = _range(block, with_zero=not group)
        top, bottom = 52 + first * ROW, 60 + (first + len(block)) * ROW
        if not group:
            zero = _x(0.0, low, high)
            draw.line((zero, top, zero, bottom), fill=COLOURS["grid"], width=2)
        else:
            draw.line((LABEL, bottom - 2, _x(high, low, high), bottom - 2), fill=COLOURS["grid"])
            draw.text((LABEL - 4, bottom - 14), f"{low:.3g}", fill=(150, 150, 150))
            draw.text((_x(high, low, high) - 20, bottom - 14), f"{high:.3g}", fill=(150, 150, 150))
        for offset, (label, colour, value, ci) in enumerate(block):
            y = 60 + (first + offset) * ROW + ROW // 2
            draw.text((10, y - 6), label[:30], fill=COLOURS["ink"])
            if value is None:
                draw.text((LABEL, y - 6), "no data", fill=COLOURS["ink"])
                continue
            if ci:
                draw.line((_x(ci[0], low, high), y, _x(ci[1], low, high), y), fill=COLOURS[colour], width=3)
            x = _x(value, low, high)
            draw.ellipse((x - 5, y - 5, x + 5, y + 5), fill=COLOURS[colour])
            draw.text((WIDTH - 120, y - 6), f"{value:.4g}", fill=COLOURS["ink"])
    if not group:
        low, high = _range(items)
        draw.text((LABEL, 62 + len(items) * ROW), f"{low:.3g}", fill=COLOURS["ink"])
        draw.text((_x(high, low, high) - 20, 62 + len(items) * ROW), f"{high:.3g}", fill=COLOURS["ink"])
    return image


def win_rate_chart(rates: dict, note: str) -> Image.Image:
    """A stacked bar of win / tie / loss shares of judged prompts (missing ones listed, not drawn)."""
    image, draw = _canvas("MLLM win rate of base + LoRA vs base (an MLLM judge, not human raters)", 1, note)
    y, left, right = 70, LABEL, WIDTH - 30
    x = left
    for name in ("win", "tie", "loss"):
        share = rates.get(f"{name}_rate") or 0.0
        end = x + share * (right - left)
        draw.rectangle((x, y, end, y + ROW - 8), fill=COLOURS[name])
        if share >= 0.08:
            draw.text((x + 4, y + 8), f"{name} {share:.0%}", fill="white")
        x = end
    draw.text(
        (10, y + 8),
        f"judged {rates.get('judged', 0)}, missing {rates.get('missing', 0)}",
        fill=COLOURS["ink"],
    )
    return image


def png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()
