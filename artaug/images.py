"""Image utilities: PNG bytes in and out, decoding that checks an image before any model sees it (so
one bad image cannot stop a dataset), and the pixel statistics the heuristic critic, the image_stats
scorer and the benchmarks measure.

`decode_image` is the one way artaug decodes bytes it did not make itself: only PNG, JPEG and WebP
(no format plugin that runs external programs), at most MAX_PIXELS pixels (a decompression bomb is
refused from its header, before any pixel is decoded), and every decoder failure becomes a
BadImageError, which stages turn into that row's error.
"""

from __future__ import annotations

import base64
import io

import numpy as np
from PIL import Image

FORMATS = ("PNG", "JPEG", "WEBP")
MAX_PIXELS = 4096 * 4096
"""Largest image decoded (FLUX images are at most about 2048 x 2048)."""
# Also PIL's own limit, for any decoder call that does not come through decode_image: PIL warns
# above it and refuses above twice it.
Image.MAX_IMAGE_PIXELS = MAX_PIXELS


class BadImageError(ValueError):
    """The bytes are not a usable image."""


def decode_image(data: bytes | None) -> Image.Image:
    """The RGB image in `data`, or BadImageError (empty, corrupt, truncated, too large, other format)."""
    if not data:
        raise BadImageError("empty image")
    try:
        image = Image.open(io.BytesIO(data), formats=FORMATS)
        width, height = image.size  # from the header: nothing decoded yet
        if width * height > MAX_PIXELS:
            raise BadImageError(f"image of {width}x{height} pixels is larger than {MAX_PIXELS} pixels")
        image.load()  # decode fully now: truncated files fail here, not inside the engine
        image = image.convert("RGB")
    except BadImageError:
        raise
    except Image.DecompressionBombError:  # PIL's own check, in open(), at twice MAX_PIXELS
        raise BadImageError(f"image is larger than {MAX_PIXELS} pixels (a decompression bomb?)") from None
    except Exception as err:  # noqa: BLE001 - decoders raise many types (DecompressionBombError, SyntaxError...)
        raise BadImageError(f"corrupt image: {type(err).__name__}: {err}"[:300]) from None
    if min(image.size) < 1:
        raise BadImageError(f"image has no pixels: {image.size}")
    return image


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


def image_statistics(image: Image.Image) -> dict[str, float]:
    rgb = np.asarray(image.convert("RGB"), dtype=np.float64) / 255.0
    luminance = rgb @ np.array([0.2126, 0.7152, 0.0722])
    hsv = np.asarray(image.convert("RGB").convert("HSV"), dtype=np.float64) / 255.0
    rg, yb = rgb[..., 0] - rgb[..., 1], 0.5 * (rgb[..., 0] + rgb[..., 1]) - rgb[..., 2]
    laplacian = (
        -4 * luminance[1:-1, 1:-1]
        + luminance[:-2, 1:-1]
        + luminance[2:, 1:-1]
        + luminance[1:-1, :-2]
        + luminance[1:-1, 2:]
    )
    return {
        "exposure": float(luminance.mean()),
        "contrast": float(luminance.std()),
        "saturation": float(hsv[..., 1].mean()),
        "colourfulness": float(np.hypot(rg.std(), yb.std()) + 0.3 * np.hypot(rg.mean(), yb.mean())),
        "sharpness": float(laplacian.var()) if laplacian.size else 0.0,
        "colour_cast": float(rgb[..., 0].mean() - rgb[..., 2].mean()),  # > 0 warm, < 0 cool
    }
