"""A SigLIP-based aesthetic predictor of the v2.5 kind.

The pooled output of a SigLIP vision tower (so400m-patch14-384 for the published head),
L2-normalised, through a linear-stack MLP head; scores are roughly 1-10 and span illustrations as
well as photographs.
"""

from __future__ import annotations

import os

import numpy as np
import torch
from transformers import AutoImageProcessor, SiglipVisionModel

from artaug.config import ScorersConfig
from artaug.hub import looks_local
from artaug.scorers.base import Scorer, check_source, to_numpy
from artaug.scorers.heads import load_head, random_head
from artaug.scorers.tiny import ensure_tiny

SIGLIP_TINY_SEED_OFFSET = 200


class SiglipAesthetic(Scorer):
    name = "siglip_aesthetic"
    columns = ("siglip_aesthetic",)

    def __init__(self, cfg: ScorersConfig, device: torch.device):
        check_source("scorers.siglip", cfg.siglip, is_file=False)
        check_source("scorers.siglip_head", cfg.siglip_head, is_file=True)
        source = cfg.siglip
        if source == "tiny":
            source = ensure_tiny("siglip", cfg.cache_dir, cfg.tiny_seed + SIGLIP_TINY_SEED_OFFSET)
        local = looks_local(source)
        path = os.path.expanduser(source) if local else source
        extra = {"local_files_only": True} if local else {}
        # A full SigLIP checkpoint (vision + text) loads its vision tower here; the text half is skipped.
        self.model = SiglipVisionModel.from_pretrained(path, **extra).eval().to(device)
        self.processor = AutoImageProcessor.from_pretrained(path, **extra)
        size = self.model.config.hidden_size
        seed = cfg.tiny_seed + SIGLIP_TINY_SEED_OFFSET
        head = random_head(size, seed) if cfg.siglip_head == "tiny" else load_head(cfg.siglip_head, size)
        self.head = head.to(device)
        self.device = device

    @torch.no_grad()
    def score(self, images, prompts) -> dict[str, np.ndarray]:
        pixels = self.processor(images=list(images), return_tensors="pt")["pixel_values"].to(self.device)
        pooled = self.model(pixel_values=pixels).pooler_output.float()
        return {"siglip_aesthetic": to_numpy(self.head(torch.nn.functional.normalize(pooled, dim=-1)))}
