"""Image bytes in and out: PNG encoding, and decoding that checks an image before any model sees it
(so one bad image cannot stop a dataset)."""

from __future__ import annotations

import base64
import io

from PIL import Image, UnidentifiedImageError


class BadImageError(ValueError):
    """The bytes are not a usable image."""


def decode_image(data: bytes | None) -> Image.Image:
    if not data:
        raise BadImageError("empty image")
    try:
        image = Image.open(io.BytesIO(data))
        image.load()  # decode fully now: truncated files fail here, not inside the engine
    except (UnidentifiedImageError, OSError, ValueError) as err:
        raise BadImageError(f"corrupt image: {err}") from None
    if min(image.size) < 1:
        raise BadImageError(f"image has no pixels: {image.size}")
    return image.convert("RGB")


def fit(image: Image.Image, max_side: int) -> Image.Image:
    """Downscale so the longer side is at most max_side (never upscale)."""
    if max(image.size) <= max_side:
        return image
    scale = max_side / max(image.size)
    size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
    return image.resize(size, Image.Resampling.LANCZOS)


def data_url(image: Image.Image) -> str:
    return "data:image/png;base64," + base64.b64encode(png_bytes(image)).decode("ascii")


def decode_data_url(url: str) -> Image.Image:
    return decode_image(base64.b64decode(url.split(",", 1)[1]))


def png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()
