"""A contact sheet of a stage's images, so a person can see a run's output at a glance."""

from __future__ import annotations

import io

from PIL import Image, ImageDraw

from artaug import storage


def contact_sheet(table, columns: int = 8, cell: int = 96) -> Image.Image:
    """A grid of the `image` column (error rows drawn as grey cells)."""
    rows = table.to_pylist()
    lines = max(1, -(-len(rows) // columns))
    sheet = Image.new("RGB", (columns * cell, lines * cell), "white")
    for i, row in enumerate(rows):
        x, y = (i % columns) * cell, (i // columns) * cell
        if row.get("image"):
            tile = Image.open(io.BytesIO(row["image"])).convert("RGB")
            tile.thumbnail((cell - 4, cell - 4))
            sheet.paste(tile, (x + 2, y + 2))
        else:
            ImageDraw.Draw(sheet).rectangle((x + 2, y + 2, x + cell - 3, y + cell - 3), fill="grey")
    return sheet


def write_contact_sheet(table, path: str) -> str:
    buffer = io.BytesIO()
    contact_sheet(table).save(buffer, format="PNG")
    storage.write_bytes(path, buffer.getvalue())
    return path
