"""Synthetic pair folders in the PAIR schema (the enhance stage's output), for training tests and benchmarks.

The before image of pair i is a smooth random colour field; its after image is the same field with
more contrast and warmer colours: a consistent "enhancement" a LoRA can learn.
"""

from __future__ import annotations

import io
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from artaug.rows import PAIR


def png(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.clip(array, 0, 255).astype(np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


def before_after(seed: int, width: int = 64, height: int = 64) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    coarse = rng.uniform(40, 200, size=(height // 16, width // 16, 3))
    before = np.kron(coarse, np.ones((16, 16, 1)))
    after = (before - 128) * 1.6 + 128 + np.array([25, 5, -20])
    return before, after


def pair_row(i: int, width: int = 64, height: int = 64, **extra) -> dict:
    before, after = before_after(i, width, height)
    row = {
        "prompt_id": f"p{i:04d}",
        "prompt": f"a quiet landscape number {i}",
        "seed": i,
        "round": 1,
        "width": width,
        "height": height,
        "steps": 4,
        "guidance": 3.5,
        "before": png(before),
        "after": png(after),
        "enhance_prompt": f"a vivid, warm landscape number {i}",
        "mode": "regional",
        "regions": "[]",
        "unchanged": False,
        "error": None,
        "seconds": 0.1,
    }
    return row | extra


def write_pairs(folder: str, rows: list[dict], files: int = 2) -> str:
    """Rows as Parquet files in `folder` (PAIR, plus any extra columns the rows carry)."""
    os.makedirs(folder, exist_ok=True)
    table = pa.Table.from_pylist(rows, schema=_schema_for(rows))
    step = max(1, -(-len(rows) // files))
    for index, start in enumerate(range(0, max(len(rows), 1), step)):
        pq.write_table(table.slice(start, step), os.path.join(folder, f"part-{index}.parquet"))
    return folder


def _schema_for(rows: list[dict]) -> pa.Schema:
    extra = [name for row in rows for name in row if name not in PAIR.names]
    result = PAIR
    for name in dict.fromkeys(extra):
        result = result.append(pa.field(name, pa.bool_() if name == "accepted" else pa.float64()))
    return result


def pair_rows() -> list[dict]:
    """8 good pairs and one of each kind of pair that must not be trained on."""
    rows = [pair_row(i, accepted=True) for i in range(8)]
    rows += [
        pair_row(8, accepted=True, after=None),
        pair_row(9, accepted=True, before=b"not a png"),
        pair_row(10, accepted=True, after=png(np.zeros((48, 64, 3)))),
        pair_row(11, accepted=True, error="enhance failed", after=None),
        pair_row(12, accepted=True, unchanged=True),
        pair_row(13, accepted=False),
    ]
    return rows
