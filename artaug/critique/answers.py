"""The rows every critic backend returns: the ids, what the model said (or why it said nothing)."""

from __future__ import annotations

import pyarrow as pa

# Columns the prepare step adds for the critic and the parser (not written to the stage output).
PREPARED = ("image_url", "box_max", "box_scale_w", "box_scale_h")
IDS = ("prompt_id", "prompt", "seed", "round")

ANSWER = pa.schema(
    [
        ("prompt_id", pa.string()),
        ("prompt", pa.string()),
        ("seed", pa.int64()),
        ("round", pa.int32()),
        ("box_max", pa.int32()),
        ("box_scale_w", pa.int32()),
        ("box_scale_h", pa.int32()),
        ("raw", pa.string()),
        ("error", pa.string()),
        ("seconds", pa.float64()),
        ("model", pa.string()),
    ]
)


def answer_row(row: dict, raw: str | None, error: str | None, seconds: float, model: str) -> dict:
    keep = {key: row[key] for key in (*IDS, "box_max", "box_scale_w", "box_scale_h")}
    return {**keep, "raw": raw, "error": error, "seconds": float(seconds), "model": model}


def answers_table(rows: list[dict], results: list[tuple], model: str) -> pa.Table:
    """rows + [(raw, error, seconds)] -> a table in the ANSWER schema."""
    out = [answer_row(row, *result, model) for row, result in zip(rows, results, strict=True)]
    return pa.Table.from_pylist(out, schema=ANSWER)
