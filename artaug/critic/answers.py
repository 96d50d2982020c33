"""The rows every critic backend reads and returns: requests (an image and its prompt, ready for the
model) in, answers (what the model said, or why it said nothing) out."""

from __future__ import annotations

import pyarrow as pa

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


def answer_row(row: dict, raw: str | None, error: str | None, seconds: float, model: str) -> dict:
    keep = {key: row[key] for key in (*IDS, *_BOX_SCALE)}
    return {**keep, "raw": raw, "error": error, "seconds": float(seconds), "model": model}


def answers_table(rows: list[dict], results: list[tuple], model: str) -> pa.Table:
    """rows + [(raw, error, seconds)] -> a table in the ANSWER schema."""
    out = [answer_row(row, *result, model) for row, result in zip(rows, results, strict=True)]
    return pa.Table.from_pylist(out, schema=ANSWER)


def failed_answers(batch: pa.Table) -> pa.Table:
    """Answer rows for requests whose image was unusable (the request's error becomes the answer's)."""
    return pa.Table.from_pylist(
        [answer_row(r, None, r["error"], 0.0, "") for r in batch.to_pylist()], schema=ANSWER
    )
