"""A contact sheet of a stage's images, so a person can see a run's output at a glance; and the
streamed reading it and the report share, so neither ever holds every image of a stage in memory.

Only the first MAX_TILES rows (by prompt_id) are drawn: the ids are read first (no images), then the
Parquet files are streamed a few rows at a time and only the chosen rows' thumbnails are kept.
"""

from __future__ import annotations

import heapq
import io
from collections.abc import Iterator

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq
from PIL import Image, ImageDraw

from artaug import storage
from artaug.images import BadImageError, decode_image

MAX_TILES = 64
BATCH_ROWS = 8


def _parquet_files(folder: str) -> tuple[pafs.FileSystem, list[str]]:
    fs, path = storage.resolve(folder)
    infos = fs.get_file_info(pafs.FileSelector(path, recursive=True))
    return fs, sorted(
        i.path for i in infos if i.type == pafs.FileType.File and _data_file(i.path[len(path) :])
    )


def _data_file(relative: str) -> bool:
    # Parquet readers skip names starting with "_" or "." (markers, temporary files) at any depth.
    return relative.endswith(".parquet") and not any(
        p.startswith(("_", ".")) for p in relative.split("/") if p
    )


def first_ids(folder: str, count: int) -> list[str]:
    """The first `count` prompt_ids of a stage folder, in prompt_id order (reads only that column)."""
    fs, files = _parquet_files(folder)
    ids: list[str] = []
    for name in files:
        with fs.open_input_file(name) as f:
            found = pq.read_table(f, columns=["prompt_id"]).column(0).drop_null().to_pylist()
            ids = heapq.nsmallest(count, [*ids, *found])
    return ids


def stream_rows(folder: str, columns: list[str], ids: set[str]) -> Iterator[dict]:
    """The rows of a stage folder whose prompt_id is in `ids` (prompt_id and `columns` only), read a
    few rows at a time."""
    fs, files = _parquet_files(folder)
    for name in files:
        with fs.open_input_file(name) as f:
            parquet = pq.ParquetFile(f)
            wanted = [c for c in dict.fromkeys(["prompt_id", *columns]) if c in parquet.schema_arrow.names]
            for batch in parquet.iter_batches(batch_size=BATCH_ROWS, columns=wanted):
                keep = pc.is_in(batch.column("prompt_id"), value_set=pa.array(sorted(ids), pa.string()))
                yield from batch.filter(keep).to_pylist()


def thumbnail(data: bytes | None, side: int) -> Image.Image | None:
    """A thumbnail of PNG/JPEG/WebP bytes; None for a missing or undecodable image."""
    try:
        image = decode_image(data)
    except BadImageError:
        return None
    image.thumbnail((side, side))
    return image


def contact_sheet(
    stage_dir: str, columns: int = 8, cell: int = 96, max_tiles: int = MAX_TILES
) -> Image.Image:
    """A grid of the `image` column of the first `max_tiles` rows (grey cells: errors, bad images)."""
    ids = first_ids(stage_dir, max_tiles)
    tiles = {
        row["prompt_id"]: thumbnail(row.get("image"), cell - 4)
        for row in stream_rows(stage_dir, ["image"], set(ids))
    }
    lines = max(1, -(-len(ids) // columns))
    sheet = Image.new("RGB", (columns * cell, lines * cell), "white")
    for i, prompt_id in enumerate(ids):
        x, y = (i % columns) * cell, (i // columns) * cell
        tile = tiles.get(prompt_id)
        if tile is not None:
            sheet.paste(tile, (x + 2, y + 2))
        else:
            ImageDraw.Draw(sheet).rectangle((x + 2, y + 2, x + cell - 3, y + cell - 3), fill="grey")
    return sheet


def write_contact_sheet(stage_dir: str, path: str) -> str:
    buffer = io.BytesIO()
    contact_sheet(stage_dir).save(buffer, format="PNG")
    storage.write_bytes(path, buffer.getvalue())
    return path
