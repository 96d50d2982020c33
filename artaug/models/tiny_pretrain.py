"""Brief pretraining of the tiny FLUX transformer on drawn, captioned shapes ("a red circle on blue").

A random tiny transformer's samples mean nothing; a few minutes of CPU on these images are enough for
it to follow colour words, so its own samples can serve as the "before" images of an experiment. Only
the transformer learns (flow matching, full weights); the text encoders stay random and fixed.

    artaug models build-tiny ./tiny-shapes --vae patch --pretrain-steps 1500
"""

from __future__ import annotations

import logging
import time

import numpy as np
import torch

from artaug.models.flow_matching import flow_matching_loss
from artaug.world import COLOURS  # the same palette as the miniature world

log = logging.getLogger(__name__)

SHAPES = ("circle", "square")
SIZE = 64


def caption(shape: str, colour: str, background: str) -> str:
    return f"a {colour} {shape} on {background}"


def all_captions() -> list[tuple[str, str, str]]:
    """Every (shape, colour, background) with two different colours."""
    return [(s, c, b) for s in SHAPES for c in COLOURS for b in COLOURS if c != b]


def draw(shape: str, colour: str, background: str, rng: np.random.Generator) -> np.ndarray:
    """A SIZE x SIZE uint8 image: the shape at a random place and size on a plain background."""
    image = np.empty((SIZE, SIZE, 3), dtype=np.uint8)
    image[:] = COLOURS[background]
    radius = rng.uniform(10, 22)
    cy, cx = rng.uniform(radius, SIZE - radius, size=2)
    y, x = np.mgrid[:SIZE, :SIZE] + 0.5
    if shape == "circle":
        inside = (y - cy) ** 2 + (x - cx) ** 2 <= radius**2
    else:
        inside = (np.abs(y - cy) <= radius * 0.85) & (np.abs(x - cx) <= radius * 0.85)
    image[inside] = COLOURS[colour]
    return image


@torch.no_grad()
def encode_images(pipe, images: np.ndarray) -> torch.Tensor:
    """uint8 (N, H, W, 3) -> FLUX-scaled latents (N, 16, H/8, W/8), as the latent cache encodes."""
    pixels = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1
    vae = pipe.vae
    return (vae.encode(pixels).latent_dist.mode() - vae.config.shift_factor) * vae.config.scaling_factor


@torch.no_grad()
def encode_captions(pipe, captions: list[str], max_tokens: int = 32):
    """{caption: (prompt_embeds, pooled)} from the pipeline's own (fixed) text encoders."""
    embeds, pooled, _ = pipe.encode_prompt(captions, None, max_sequence_length=max_tokens)
    return {c: (embeds[i], pooled[i]) for i, c in enumerate(captions)}


def pretrain(pipe, steps: int, seed: int = 0, batch: int = 16, lr: float = 1e-3) -> list[float]:
    """Train pipe.transformer in place on freshly drawn shapes; returns the loss per step."""
    rng = np.random.default_rng(seed)
    generator = torch.Generator().manual_seed(seed)
    captions = all_captions()
    text = encode_captions(pipe, [caption(*c) for c in captions])
    transformer = pipe.transformer.train().requires_grad_(True)
    optimizer = torch.optim.AdamW(transformer.parameters(), lr=lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, steps, eta_min=lr / 10)
    losses, started = [], time.perf_counter()
    for step in range(steps):
        picks = [captions[i] for i in rng.integers(len(captions), size=batch)]
        latents = encode_images(pipe, np.stack([draw(*p, rng) for p in picks]))
        embeds = torch.stack([text[caption(*p)][0] for p in picks])
        pooled = torch.stack([text[caption(*p)][1] for p in picks])
        # One guidance value per batch, drawn from the range samplers use, so any of them works later.
        guidance = float(rng.uniform(1.0, 4.0))
        loss = flow_matching_loss(transformer, latents, embeds, pooled, generator, guidance)
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(transformer.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        losses.append(loss.item())
        if (step + 1) % 100 == 0:
            log.info("pretrain step %d/%d loss %.4f (%.0f s)", step + 1, steps, np.mean(losses[-100:]),
                     time.perf_counter() - started)  # fmt: skip
    transformer.eval().requires_grad_(False)
    return losses
