"""Columns shared by stages. Ids (prompt_id, seed, round) never change from stage to stage."""

from __future__ import annotations

import pyarrow as pa

GENERATE = pa.schema(
    [
        ("prompt_id", pa.string()),
        ("prompt", pa.string()),
        ("seed", pa.int64()),
        ("round", pa.int32()),
        ("width", pa.int32()),
        ("height", pa.int32()),
        ("steps", pa.int32()),
        ("guidance", pa.float32()),
        ("image", pa.binary()),  # PNG bytes; null on error rows
        ("error", pa.string()),  # null when the row succeeded
        ("warning", pa.string()),  # e.g. the prompt was truncated; null when none
        ("seconds", pa.float64()),  # this row's share of its batch's wall time
    ]
)
