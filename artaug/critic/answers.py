"""The rows every critic backend reads and returns: requests (an image and its prompt, ready for the
model) in, answers (what the model said, or why it said nothing) out; and the rule that a stage
whose critic failed on too many rows fails instead of passing on a column of errors."""

from __future__ import annotations

import pyarrow as pa

from artaug.errors import ArtaugError

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
