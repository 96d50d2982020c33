"""Safety checking: is an image too close to any configured unsafe concept?

`SafetyChecker` is the interface the filter and evaluation use. `ClipConceptChecker` compares CLIP
image embeddings with the text embeddings of a configurable list of unsafe concepts, each with a
cosine-similarity threshold, and loads its CLIP from a local folder, a hub id or "tiny". Thresholds
depend on the CLIP model: tune them on a labelled sample of your own images.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from PIL import Image

from artaug import storage
from artaug.config import SafetyConfig, ScorersConfig
from artaug.errors import ArtaugError
from artaug.scorers.base import check_source, pick_device
from artaug.scorers.clip_family import ClipBackbone

SAFETY_TINY_SEED_OFFSET = 300


class SafetyConfigError(ArtaugError, ValueError):
    """The unsafe-concept list cannot be read; the message names the file."""


@dataclass
class SafetyResult:
    unsafe: bool
    margin: float
    """Similarity minus threshold of the closest concept (>= 0 means unsafe)."""
    concept: str
    """The concept with the largest margin."""


class SafetyChecker:
    def check(self, images: Sequence[Image.Image]) -> list[SafetyResult]:
        raise NotImplementedError


def concept_thresholds(cfg: SafetyConfig) -> dict[str, float]:
    """{concept: threshold} from cfg.concepts_file when set, else cfg.concepts with cfg.threshold."""
    if not cfg.concepts_file:
        return {concept: cfg.threshold for concept in cfg.concepts}
    try:
        data = json.loads(storage.read_bytes(cfg.concepts_file))
    except FileNotFoundError:
        raise SafetyConfigError(f"safety.concepts_file: {cfg.concepts_file!r} does not exist") from None
    except json.JSONDecodeError as err:
        raise SafetyConfigError(
            f"safety.concepts_file: {cfg.concepts_file!r} is not JSON: {err.msg}"
        ) from None
    if (
        not isinstance(data, dict)
        or not data
        or not all(isinstance(v, int | float) and not isinstance(v, bool) for v in data.values())
    ):
        raise SafetyConfigError(
            f"safety.concepts_file: {cfg.concepts_file!r} must be a non-empty object {{concept: threshold}}"
        )
    return {str(k): float(v) for k, v in data.items()}


class ClipConceptChecker(SafetyChecker):
    def __init__(self, cfg: SafetyConfig, scorers: ScorersConfig, device: torch.device | None = None):
        check_source("safety.model", cfg.model, is_file=False)
        thresholds = concept_thresholds(cfg)
        self.concepts = list(thresholds)
        device = device or pick_device(scorers.device)
        seed = scorers.tiny_seed + SAFETY_TINY_SEED_OFFSET
        self.backbone = ClipBackbone(cfg.model, device, scorers.cache_dir, seed)
        self.concept_embeddings = self.backbone.text_embeddings(self.concepts)
        self.thresholds = torch.tensor([thresholds[c] for c in self.concepts], device=device)

    def similarities(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """Cosine similarity of each image (rows) with each concept (columns)."""
        return self.backbone.image_embeddings(images) @ self.concept_embeddings.T

    def check(self, images: Sequence[Image.Image]) -> list[SafetyResult]:
        margins = self.similarities(images) - self.thresholds
        best, index = margins.max(dim=1)
        return [
            SafetyResult(unsafe=bool(m >= 0), margin=float(m), concept=self.concepts[int(i)])
            for m, i in zip(best.tolist(), index.tolist(), strict=True)
        ]
