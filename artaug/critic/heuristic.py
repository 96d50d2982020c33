"""A critic without a model: measures the pixels and emits the same schema as the VLM critics.

Deterministic. It suggests global adjustments when exposure, contrast, saturation, colour cast or
sharpness fall outside comfortable ranges, and regions where part of the image is clearly too dark
or too bright. For tests, ablations, and machines without a VLM.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

from artaug.images import image_statistics

# Comfortable ranges (0-1 scales) for the statistics below.
EXPOSURE = (0.35, 0.70)  # mean luminance
CONTRAST = 0.15  # luminance standard deviation below this is flat
SATURATION = (0.20, 0.75)  # mean HSV saturation
CAST = 0.08  # |mean(R) - mean(B)| above this is a colour cast
SHARPNESS = 0.002  # Laplacian variance below this is soft
GRID = 3  # regions are cells of a GRID x GRID split
REGION_DARK, REGION_BRIGHT = 0.12, 0.92


def heuristic_critique(image: Image.Image, prompt: str) -> dict:
    """A critique in the schema's shape (integer 0-1000 boxes), from the image statistics alone."""
    stats = image_statistics(image)
    adjustments = []

    def suggest(aspect: str, direction: str, distance: float, note: str) -> None:
        strength = int(min(5, max(1, round(1 + distance * 20))))
        adjustments.append({"aspect": aspect, "direction": direction, "strength": strength, "note": note})

    low, high = EXPOSURE
    if stats["exposure"] < low:
        suggest("exposure", "increase", low - stats["exposure"], "the image is underexposed")
    elif stats["exposure"] > high:
        suggest("exposure", "decrease", stats["exposure"] - high, "the image is overexposed")
    if stats["contrast"] < CONTRAST:
        suggest("contrast", "increase", CONTRAST - stats["contrast"], "tones look flat and washed out")
    low, high = SATURATION
    if stats["saturation"] < low:
        suggest("saturation", "increase", low - stats["saturation"], "colours are dull")
    elif stats["saturation"] > high:
        suggest("saturation", "decrease", stats["saturation"] - high, "colours are oversaturated")
    if abs(stats["colour_cast"]) > CAST:
        warm = stats["colour_cast"] > 0
        suggest("color_temperature", "decrease" if warm else "increase", abs(stats["colour_cast"]) - CAST,
                "a warm colour cast" if warm else "a cool colour cast")  # fmt: skip
    if stats["sharpness"] < SHARPNESS:
        suggest("sharpness", "increase", SHARPNESS - stats["sharpness"], "details are soft")
    regions = _problem_regions(image, stats["exposure"], prompt)
    penalty = sum(a["strength"] for a in adjustments) / 2 + len(regions)
    return {
        "assessment": _assessment(adjustments, regions),
        "rating": int(max(1, min(10, round(8 - penalty)))),
        "adjustments": adjustments[:4],
        "regions": regions[:4],
        "rewritten_prompt": "",
    }


def _problem_regions(image: Image.Image, exposure: float, prompt: str) -> list[dict]:
    luminance = np.asarray(image.convert("L"), dtype=np.float64) / 255.0
    height, width = luminance.shape
    regions = []
    for row in range(GRID):
        for col in range(GRID):
            y0, y1 = row * height // GRID, (row + 1) * height // GRID
            x0, x1 = col * width // GRID, (col + 1) * width // GRID
            mean = luminance[y0:y1, x0:x1].mean() if y1 > y0 and x1 > x0 else exposure
            if mean < REGION_DARK and exposure > REGION_DARK * 2:
                detail = "brighter, with visible detail in the shadows"
            elif mean > REGION_BRIGHT and exposure < REGION_BRIGHT - 0.2:
                detail = "softer highlights with recovered detail"
            else:
                continue
            box = [x0 * 1000 // width, y0 * 1000 // height, x1 * 1000 // width, y1 * 1000 // height]
            regions.append({"box": box, "prompt": f"{prompt[:60]}, {detail}"[:100]})
    return regions


def _assessment(adjustments: list[dict], regions: list[dict]) -> str:
    if not adjustments and not regions:
        return "Well exposed and balanced; no change needed."
    notes = [a["note"] for a in adjustments] + (
        [f"{len(regions)} region(s) need local fixes"] if regions else []
    )
    return ("; ".join(notes).capitalize() + ".")[:200]
