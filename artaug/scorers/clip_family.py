"""CLIP-based scorers: the LAION aesthetic predictor, CLIP score, and a preference model.

- `laion_aesthetic`: CLIP (ViT-L/14 for the published head) image embedding, L2-normalised, through
  the LAION MLP head; roughly 1-10.
- `clip_score`: 100 x cosine(image embedding, prompt embedding), the text-image alignment measure.
- `preference`: a CLIP fine-tuned on human preference pairs (PickScore; HPSv2 once converted to the
  transformers layout): logit_scale x cosine, as these models are trained to rank images.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image
from transformers import AutoImageProcessor, AutoTokenizer, CLIPModel

from artaug.config import ScorersConfig
from artaug.hub import looks_local
from artaug.scorers.base import (
    Scorer,
    ScorerWeightsError,
    check_source,
    load_state_dict,
    to_numpy,
)
from artaug.scorers.heads import load_head, random_head
from artaug.scorers.tiny import ensure_tiny

PREFERENCE_TINY_SEED_OFFSET = 100  # the tiny preference model differs from the tiny CLIP


class ClipBackbone:
    """A CLIPModel with its tokenizer and image processor, loaded from a folder, a hub id or "tiny"."""

    def __init__(
        self, source: str, device: torch.device, cache_dir: str, tiny_seed: int, processor: str = ""
    ):
        if source == "tiny":
            source = ensure_tiny("clip", cache_dir, tiny_seed)
        local = looks_local(source)
        path = os.path.expanduser(source) if local else source
        extra = {"local_files_only": True} if local else {}
        processor_path = os.path.expanduser(processor) if processor else path
        processor_extra = {"local_files_only": True} if processor and looks_local(processor) else extra
        self.model = CLIPModel.from_pretrained(path, **extra).eval().to(device)
        self.tokenizer = AutoTokenizer.from_pretrained(processor_path, **processor_extra)
        self.image_processor = AutoImageProcessor.from_pretrained(processor_path, **processor_extra)
        self.device = device
        self.max_tokens = min(self.model.config.text_config.max_position_embeddings, 77)

    @torch.no_grad()
    def image_embeddings(self, images: Sequence[Image.Image]) -> torch.Tensor:
        pixels = self.image_processor(images=list(images), return_tensors="pt")["pixel_values"]
        features = _pooled(self.model.get_image_features(pixel_values=pixels.to(self.device)))
        return torch.nn.functional.normalize(features.float(), dim=-1)

    @torch.no_grad()
    def text_embeddings(self, prompts: Sequence[str]) -> torch.Tensor:
        tokens = self.tokenizer(
            list(prompts), padding=True, truncation=True, max_length=self.max_tokens, return_tensors="pt"
        )
        tokens = {k: v.to(self.device) for k, v in tokens.items() if k in ("input_ids", "attention_mask")}
        return torch.nn.functional.normalize(_pooled(self.model.get_text_features(**tokens)).float(), dim=-1)


def _pooled(output) -> torch.Tensor:
    """transformers 5 returns an output object whose pooler_output holds the projected features."""
    return output if isinstance(output, torch.Tensor) else output.pooler_output


class LaionAesthetic(Scorer):
    name = "laion_aesthetic"
    columns = ("laion_aesthetic",)

    def __init__(self, cfg: ScorersConfig, device: torch.device):
        check_source("scorers.clip", cfg.clip, is_file=False)
        check_source("scorers.laion_head", cfg.laion_head, is_file=True)
        self.backbone = ClipBackbone(cfg.clip, device, cfg.cache_dir, cfg.tiny_seed)
        size = self.backbone.model.config.projection_dim
        head = (
            random_head(size, cfg.tiny_seed) if cfg.laion_head == "tiny" else load_head(cfg.laion_head, size)
        )
        self.head = head.to(device)

    @torch.no_grad()
    def score(self, images, prompts) -> dict[str, np.ndarray]:
        return {"laion_aesthetic": to_numpy(self.head(self.backbone.image_embeddings(images)))}


class ClipScore(Scorer):
    name = "clip_score"
    columns = ("clip_score",)

    def __init__(self, cfg: ScorersConfig, device: torch.device):
        check_source("scorers.clip", cfg.clip, is_file=False)
        self.backbone = ClipBackbone(cfg.clip, device, cfg.cache_dir, cfg.tiny_seed)

    def score(self, images, prompts) -> dict[str, np.ndarray]:
        cosine = (self.backbone.image_embeddings(images) * self.backbone.text_embeddings(prompts)).sum(-1)
        return {"clip_score": to_numpy(100.0 * cosine)}


class PreferenceScore(Scorer):
    name = "preference"
    columns = ("preference",)

    def __init__(self, cfg: ScorersConfig, device: torch.device):
        check_source("scorers.preference", cfg.preference, is_file=False)
        seed = cfg.tiny_seed + PREFERENCE_TINY_SEED_OFFSET
        processor = "" if cfg.preference == "tiny" else cfg.preference_processor
        self.backbone = ClipBackbone(cfg.preference, device, cfg.cache_dir, seed, processor)
        if cfg.preference_weights:
            load_weights_into(self.backbone.model, cfg.preference_weights)

    def score(self, images, prompts) -> dict[str, np.ndarray]:
        cosine = (self.backbone.image_embeddings(images) * self.backbone.text_embeddings(prompts)).sum(-1)
        scale = self.backbone.model.logit_scale.exp().item()
        return {"preference": to_numpy(scale * cosine)}


def load_weights_into(model: torch.nn.Module, path: str) -> None:
    """Load a state dict file over `model`; every key must match (a partial load would be silent)."""
    tensors = load_state_dict(path)
    expected = model.state_dict()
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    if missing or unexpected:
        raise ScorerWeightsError(
            f"{path!r} does not fit the model: {len(missing)} missing keys (e.g. {missing[:2]}), "
            f"{len(unexpected)} unexpected (e.g. {unexpected[:2]})"
        )
    model.load_state_dict({k: v.to(expected[k].dtype) for k, v in tensors.items()})
