"""Image statistics as scores (no weights): exposure, contrast, saturation, colourfulness, sharpness.

Cheap, deterministic and meaningful even on tiny models' images; the same measurements the
heuristic critic uses, so a filter or evaluation can check what the critic asked for.
"""

from __future__ import annotations

import numpy as np

from artaug.config import ScorersConfig
from artaug.images import image_statistics
from artaug.scorers.base import Scorer

KEYS = ("exposure", "contrast", "saturation", "colourfulness", "sharpness")


class ImageStats(Scorer):
    name = "image_stats"
    columns = tuple(f"stats_{key}" for key in KEYS)

    def __init__(self, cfg: ScorersConfig | None = None, device=None):
        pass

    def score(self, images, prompts) -> dict[str, np.ndarray]:
        stats = [image_statistics(image) for image in images]
        return {f"stats_{key}": np.array([s[key] for s in stats], dtype=np.float64) for key in KEYS}
