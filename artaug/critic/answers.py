"""The rows every critic backend reads and returns: requests (an image and its prompt, ready for the
model) in, answers (what the model said, or why it said nothing) out; what an answer says once
parsed; and the rule that a stage whose critic failed on too many rows fails instead of passing on a
column of errors. The critique stage and the served critic (`artaug.serve.critic`) both use them."""

from __future__ import annotations

import json

import pyarrow as pa
from PIL import Image

from artaug.config import CritiqueConfig
from artaug.critic.schema import CritiqueError, has_suggestions, parse_critique, qwen25_resized_size
from artaug.errors import ArtaugError
from artaug.images import data_url, fit

IDS = ("prompt_id", "prompt", "seed", "round")
_BOX_SCALE = ("box_max", "box_scale_w", "box_scale_h")

# A request row: the image as a data URL, the largest box coordinate the model may emit and the size
# its pixel boxes refer to (see critic.schema); `error` set means the image was unusable.
REQUEST = pa.schema(
    [
        ("prompt_id", pa.string()),
        ("prompt", pa.string()),
        ("seed", pa.int64()),
        ("round", pa.int32()),
        ("image_url", pa.string()),
        *((name, pa.int32()) for name in _BOX_SCALE),
        ("error", pa.string()),
    ]
)

ANSWER = pa.schema(
    [
        ("prompt_id", pa.string()),
        ("prompt", pa.string()),
        ("seed", pa.int64()),
        ("round", pa.int32()),
        *((name, pa.int32()) for name in _BOX_SCALE),
        ("raw", pa.string()),
        ("error", pa.string()),
        ("seconds", pa.float64()),
        ("model", pa.string()),
    ]
)


class CriticFailedError(ArtaugError, RuntimeError):
    """More of a stage's rows failed in the critic than critique.max_failed_fraction allows."""


def storable(text: str | None) -> str | None:
    """Text Arrow can store: a JSON answer can carry lone surrogates (\\ud800), which UTF-8 cannot."""
    return None if text is None else text.encode("utf-8", "replace").decode("utf-8")


def answer_row(row: dict, raw, error: str | None, seconds: float, model: str) -> dict:
    """One answer row; an answer that is not text becomes the row's error, never a failed batch."""
    if raw is not None and not isinstance(raw, str):
        raw, error = None, error or f"the answer is {type(raw).__name__}, not text"
    keep = {key: row[key] for key in (*IDS, *_BOX_SCALE)}
    return {**keep, "raw": storable(raw), "error": storable(None if error is None else str(error)),
            "seconds": float(seconds or 0.0), "model": model}  # fmt: skip


def answers_table(rows: list[dict], results: list[tuple], model: str) -> pa.Table:
    """rows + [(raw, error, seconds)] -> a table in the ANSWER schema."""
    out = [answer_row(row, *result, model) for row, result in zip(rows, results, strict=True)]
    return pa.Table.from_pylist(out, schema=ANSWER)


def failed_answers(batch: pa.Table) -> pa.Table:
    """Answer rows for requests whose image was unusable (the request's error becomes the answer's)."""
    return pa.Table.from_pylist(
        [answer_row(r, None, r["error"], 0.0, "") for r in batch.to_pylist()], schema=ANSWER
    )


def check_failures(what: str, errors: list[str | None], max_fraction: float) -> None:
    """Raise when the critic failed on more than `max_fraction` of the rows it was asked about
    (`errors`: one per asked row, None where it answered): a dead or broken critic fails its stage."""
    failed = [error for error in errors if error]
    if not errors or len(failed) <= max_fraction * len(errors):
        return
    first = " ".join(failed[0].split())[:300]
    raise CriticFailedError(
        f"{what}: the critic failed on {len(failed)} of {len(errors)} rows (more than"
        f" critique.max_failed_fraction {max_fraction}); first error: {first}"
    )


def request_for(ids: dict, image: Image.Image, cfg: CritiqueConfig) -> dict:
    """The request row for a decoded image: downscaled to critique.image_max_side, as a data URL, with
    the box scale its answer will use (`pixels` boxes refer to the processor's resized size)."""
    image = fit(image, cfg.image_max_side)
    request = {key: ids[key] for key in IDS}
    request.update(image_url=data_url(image), box_max=1000, box_scale_w=1000, box_scale_h=1000, error=None)
    if cfg.box_format == "pixels":
        w, h = qwen25_resized_size(*image.size, cfg.vlm_min_pixels, cfg.vlm_max_pixels)
        request.update(box_max=max(w, h), box_scale_w=w, box_scale_h=h)
    return request


def read_answer(answer: dict, box_format: str) -> dict:
    """status (ok, invalid or failed), critique (the parsed JSON text), rating, suggestions and error
    of an answer row."""
    read = {
        "status": "failed",
        "critique": None,
        "rating": None,
        "suggestions": None,
        "error": answer["error"],
    }
    if answer["error"] or answer["raw"] is None:
        return {**read, "error": answer["error"] or "no answer"}
    scale = (answer["box_scale_w"], answer["box_scale_h"])
    try:
        parsed = parse_critique(answer["raw"], box_format, scale)
    except CritiqueError as err:
        return {**read, "status": "invalid", "error": str(err)}
    count = len(parsed["adjustments"]) + len(parsed["regions"]) + bool(parsed["rewritten_prompt"])
    return {**read, "status": "ok", "critique": json.dumps(parsed), "rating": parsed["rating"],
            "suggestions": count if has_suggestions(parsed) else 0}  # fmt: skip
