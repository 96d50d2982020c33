"""A pair set as training sees it: which rows are eligible, checked before anything heavy starts.

Reads only small Parquet columns (no torch, no Ray), so `artaug train` refuses a missing or useless
pair folder at once; the latent cache and the loop's stopping rule ask the same functions.
"""

from __future__ import annotations

from collections import Counter

import pyarrow as pa
import pyarrow.parquet as pq

from artaug import storage
from artaug.errors import ArtaugError


class PairsError(ArtaugError, ValueError):
    """The pair set is missing, unreadable or holds no pair that can be trained on."""


def eligible_pairs(pairs_dir: str) -> tuple[int, Counter]:
    """(rows, Counter of exclusion reasons), read from small columns; PairsError when none is eligible."""
    table = read_pairs(pairs_dir, columns=["error", "unchanged", "accepted"])
    reasons = Counter(r for r in map(exclusion, table.to_pylist()) if r)
    if table.num_rows - sum(reasons.values()) == 0:
        detail = ", ".join(f"{n} {reason}" for reason, n in sorted(reasons.items())) or "the set is empty"
        raise PairsError(f"no pairs to train on in {pairs_dir}: {table.num_rows} rows ({detail})")
    return table.num_rows, reasons


def read_pairs(pairs_dir: str, columns: list[str] | None = None) -> pa.Table:
    """Pair rows (PAIR, maybe with the filter's columns); missing optional columns are skipped."""
    if not storage.exists(pairs_dir):
        raise PairsError(f"pairs folder {pairs_dir} does not exist")
    fs, path = storage.resolve(pairs_dir)
    try:
        dataset = pq.ParquetDataset(path, filesystem=fs)
    except Exception as err:  # noqa: BLE001 - any reader failure is a bad pair folder
        raise PairsError(f"pairs folder {pairs_dir}: not readable as Parquet ({err})") from None
    names = dataset.schema.names
    wanted = [c for c in columns if c in names] if columns is not None else None
    return dataset.read(columns=wanted)


def exclusion(row: dict) -> str | None:
    """Why an earlier stage's verdict keeps this row out of training (None: it is eligible)."""
    if row.get("error"):
        return "error rows"
    if row.get("unchanged"):
        return "unchanged"
    if row.get("accepted") is False:
        return "not accepted"
    return None
