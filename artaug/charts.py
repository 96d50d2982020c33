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
    return LABEL + (value - low) / span * (WIDTH - LABEL - 30)


def interval_chart(title: str, note: str, items: list[tuple[str, str, float, list | None]]) -> Image.Image:
    """One dot with an interval per (label, colour key, value, [low, high]); values share one axis."""
    points = [v for _, _, v, ci in items for v in ([v] + (ci or [])) if v is not None]
    low, high = (min(points + [0.0]), max(points + [0.0])) if points else (0.0, 1.0)
    pad = (high - low) * 0.08 or 1.0
    low, high = low - pad, high + pad
    image, draw = _canvas(title, len(items), note)
    zero = _x(0.0, low, high)
    draw.line((zero, 50, zero, 60 + len(items) * ROW), fill=COLOURS["grid"], width=2)
    for row, (label, colour, value, ci) in enumerate(items):
        y = 60 + row * ROW + ROW // 2
        draw.text((10, y - 6), label[:30], fill=COLOURS["ink"])
        if value is None:
            draw.text((LABEL, y - 6), "no data", fill=COLOURS["ink"])
            continue
        if ci:
            draw.line((_x(ci[0], low, high), y, _x(ci[1], low, high), y), fill=COLOURS[colour], width=3)
        x = _x(value, low, high)
        draw.ellipse((x - 5, y - 5, x + 5, y + 5), fill=COLOURS[colour])
        draw.text((WIDTH - 120, y - 6), f"{value:.4g}", fill=COLOURS["ink"])
    draw.text((LABEL, 62 + len(items) * ROW), f"{low:.3g}", fill=COLOURS["ink"])
    draw.text((WIDTH - 80, 62 + len(items) * ROW), f"{high:.3g}", fill=COLOURS["ink"])
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
