"""Tiny random scorer backbones (CLIP, SigLIP vision) saved like hub checkpoints, built once.

The scorers load them through the same `from_pretrained` code as real models, so tests exercise the
real loading path. Their scores mean nothing.
"""

from __future__ import annotations

import torch
from transformers import (
    CLIPConfig,
    CLIPImageProcessor,
    CLIPModel,
    SiglipImageProcessor,
    SiglipVisionConfig,
    SiglipVisionModel,
)

from artaug.models.cache import build_once
from artaug.models.tiny import char_tokenizer

IMAGE_SIDE = 32
WIDTH = 32


def build_tiny_clip(directory: str, seed: int = 0) -> str:
    torch.manual_seed(seed)
    tokenizer = char_tokenizer(bos="<|startoftext|>", eos="<|endoftext|>", pad="<|endoftext|>")
    config = CLIPConfig(
        text_config=dict(
            vocab_size=len(tokenizer),
            hidden_size=WIDTH,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=2,
            max_position_embeddings=77,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        ),
        vision_config=dict(
            hidden_size=WIDTH,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=2,
            image_size=IMAGE_SIDE,
            patch_size=8,
        ),
        projection_dim=24,
    )
    CLIPModel(config).eval().save_pretrained(directory, safe_serialization=True)
    tokenizer.save_pretrained(directory)
    CLIPImageProcessor(
        size={"shortest_edge": IMAGE_SIDE}, crop_size={"height": IMAGE_SIDE, "width": IMAGE_SIDE}
    ).save_pretrained(directory)
    return directory


def build_tiny_siglip(directory: str, seed: int = 0) -> str:
    torch.manual_seed(seed)
    config = SiglipVisionConfig(
        hidden_size=WIDTH,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        image_size=IMAGE_SIDE,
        patch_size=8,
    )
    SiglipVisionModel(config).eval().save_pretrained(directory, safe_serialization=True)
    SiglipImageProcessor(size={"height": IMAGE_SIDE, "width": IMAGE_SIDE}).save_pretrained(directory)
    return directory


BUILDERS = {"clip": build_tiny_clip, "siglip": build_tiny_siglip}


def ensure_tiny(kind: str, cache_dir: str, seed: int = 0) -> str:
    """The tiny `kind` model's folder under cache_dir, built on first use."""
    return build_once(
        cache_dir, f"tiny-{kind}-scorer-v1-seed{seed}", lambda folder: BUILDERS[kind](folder, seed)
    )
