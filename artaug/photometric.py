"""Apply a critique's global adjustments to the original pixels: deterministic, no model.

For ablations, for the heuristic critic, and for tests where a tiny model cannot follow prompts.
Each adjustment moves one statistic by `step` per strength unit in the asked direction; aspects that
pixels alone cannot change (composition, camera angle, ...) and the direction "change" are skipped.
"""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageEnhance

SIGN = {"increase": 1.0, "decrease": -1.0}


def _scale_rgb(image: Image.Image, factors: tuple[float, float, float]) -> Image.Image:
    pixels = np.asarray(image, dtype=np.float64) * np.array(factors)
    return Image.fromarray(np.clip(np.round(pixels), 0, 255).astype(np.uint8))


def _exposure(image, amount):
    return _scale_rgb(image, (1 + amount,) * 3)


def _temperature(image, amount):  # increase = warmer
    return _scale_rgb(image, (1 + amount / 2, 1.0, 1 - amount / 2))


APPLIERS = {
    "exposure": _exposure,
    "lighting": _exposure,
    "contrast": lambda image, amount: ImageEnhance.Contrast(image).enhance(1 + amount),
    "saturation": lambda image, amount: ImageEnhance.Color(image).enhance(1 + amount),
    "color": lambda image, amount: ImageEnhance.Color(image).enhance(1 + amount),
    "sharpness": lambda image, amount: ImageEnhance.Sharpness(image).enhance(1 + 2 * amount),
    "color_temperature": _temperature,
}


def apply_adjustments(image: Image.Image, adjustments: list[dict], step: float = 0.08):
    """(adjusted image, the adjustments applied) for the critique's global adjustments."""
    image, applied = image.convert("RGB"), []
    for adjustment in adjustments:
        apply = APPLIERS.get(adjustment["aspect"])
        sign = SIGN.get(adjustment["direction"])
        if apply is None or sign is None:
            continue
        image = apply(image, sign * step * adjustment["strength"])
        applied.append(adjustment)
    return image, applied
