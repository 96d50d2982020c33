"""The critique schema (versioned JSON schema shipped in the package), parsing and box conversion.

Decoders are constrained to the schema; we still validate every answer, because an endpoint may
ignore the constraint. A parsed critique carries boxes as normalised floats [x0, y0, x1, y1] in
[0, 1], converted from the model's integers:
- Qwen2-VL (`box_format: norm1000`): integers on a 0-1000 scale of the image; divide by 1000.
- Qwen2.5-VL (`box_format: pixels`): absolute pixels of the image *as the processor resized it*
  (sides rounded to multiples of 28 within min/max pixels, see `qwen25_resized_size`); divide by
  that resized width and height, not by the original image's.
"""

from __future__ import annotations

import json
import math
from functools import cache
from importlib import resources

import jsonschema

SCHEMA_VERSION = "critique-v1"
ADJUSTMENT_ASPECTS = (
    "exposure", "contrast", "saturation", "color_temperature", "lighting", "sharpness",
    "composition", "camera_angle", "atmosphere", "color", "other",
)  # fmt: skip
DIRECTIONS = ("increase", "decrease", "change")


class CritiqueError(ValueError):
    """An answer that is not a valid critique; the message says why."""


@cache
def critique_schema(box_max: int = 1000) -> dict:
    """The JSON schema; `box_max` is the largest box coordinate the decoder may emit."""
    text = resources.files("artaug.critic").joinpath(f"{SCHEMA_VERSION}.schema.json").read_text()
    schema = json.loads(text)
    schema["properties"]["regions"]["items"]["properties"]["box"]["items"]["maximum"] = box_max
    return schema


def parse_critique(
    raw: str, box_format: str = "norm1000", image_size: tuple[int, int] = (1000, 1000)
) -> dict:
    """Parse and validate an answer; returns the critique with boxes normalised to [0, 1].

    `image_size` is (width, height) of the image the model saw, used for `pixels` boxes. Regions whose
    box is empty, inverted or outside the image move to `rejected_regions` with the reason.
    """
    try:
        data = json.loads(raw, strict=False)  # raw control characters in strings are tolerated
    except json.JSONDecodeError as err:
        raise CritiqueError(f"not JSON: {err.msg} at character {err.pos}") from None
    except RecursionError:
        raise CritiqueError("not JSON: nested too deeply") from None
    box_max = 1000 if box_format == "norm1000" else max(image_size)
    try:
        jsonschema.validate(data, critique_schema(box_max))
    except jsonschema.ValidationError as err:
        where = "/".join(str(p) for p in err.absolute_path) or "(top level)"
        raise CritiqueError(f"schema violation at {where}: {err.message}") from None
    scale = (1000, 1000) if box_format == "norm1000" else image_size
    kept, rejected = [], []
    for number, region in enumerate(data["regions"]):
        try:
            kept.append({**region, "box": normalise_box(region["box"], scale, number)})
        except CritiqueError as err:  # one bad box does not spoil the rest of the critique
            rejected.append({**region, "reason": str(err)})
    data["regions"], data["rejected_regions"] = kept, rejected
    data["schema_version"] = SCHEMA_VERSION
    return data


def normalise_box(box: list[int], scale: tuple[int, int], number: int = 0) -> list[float]:
    """Integers on a width x height grid -> floats in [0, 1]; rejects empty or inverted boxes."""
    width, height = scale
    x0, y0, x1, y1 = box[0] / width, box[1] / height, box[2] / width, box[3] / height
    if not (0 <= x0 < x1 <= 1 and 0 <= y0 < y1 <= 1):
        raise CritiqueError(
            f"region {number}: box {box} is empty, inverted or outside the image (need x0<x1, y0<y1)"
        )
    return [round(v, 6) for v in (x0, y0, x1, y1)]


def qwen25_resized_size(width: int, height: int, min_pixels: int, max_pixels: int, factor: int = 28):
    """The (width, height) Qwen2.5-VL's processor resizes an image to; its pixel boxes refer to it."""
    w = max(factor, round(width / factor) * factor)
    h = max(factor, round(height / factor) * factor)
    if w * h > max_pixels:
        shrink = math.sqrt(width * height / max_pixels)
        w = max(factor, math.floor(width / shrink / factor) * factor)
        h = max(factor, math.floor(height / shrink / factor) * factor)
    elif w * h < min_pixels:
        grow = math.sqrt(min_pixels / (width * height))
        w = math.ceil(width * grow / factor) * factor
        h = math.ceil(height * grow / factor) * factor
    return w, h


def has_suggestions(critique: dict) -> bool:
    return bool(critique.get("adjustments") or critique.get("regions") or critique.get("rewritten_prompt"))
