"""Building the world's two CNN scorers from rendered scenes: seeded data, a fixed number of steps.

Training pictures are `world.render`ed scenes: most drawn from the world's prior (every size,
placement, exposure and contrast), a tenth with a subject larger than the prior allows, up to
filling the frame, so both nets have seen the picture a runaway model might draw. Labels come from
the true scene, never from a scorer: `world.quality(scene)` for the quality net; shape, colour and
background for the alignment net, except where less than 2% of the background shows, where all
three heads are taught "cannot tell" (uniform targets). Light pixel noise and horizontal flips
(the world is symmetric left to right) stand in for a generator's imperfections.

Same seed, steps and torch on one thread: the same weights (`scripts/build_world_scorers.py`).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F

from artaug import world
from artaug.scorers.world import COLOUR_NAMES, WorldNet, alignment_net, downscale, quality_net, split_heads

log = logging.getLogger(__name__)

OVERSIZE_SHARE = 0.1
OVERSIZE = (math.log(0.45), math.log(1.3))  # log area share of the oversized subjects
HIDDEN_BACKGROUND = 0.02  # below this share of background pixels, nothing can be told
NOISE = 6.0  # largest standard deviation of the pixel noise added in training (0..255 scale)


def draw_scenes(count: int, rng: np.random.Generator) -> list[world.Scene]:
    """`count` scenes: shape, colours and attributes from the prior; OVERSIZE_SHARE of them with a
    subject as large as OVERSIZE, centred."""
    ids = world.scenes()
    drawn = []
    for _ in range(count):
        scene = world.random_scene(*ids[rng.integers(len(ids))], rng)
        if rng.random() < OVERSIZE_SHARE:
            scene = dataclasses.replace(scene, size=float(rng.uniform(*OVERSIZE)), dx=0.0, dy=0.0)
        drawn.append(scene)
    return drawn


def background_share(scene: world.Scene, picture: np.ndarray) -> float:
    """The share of the picture's pixels that are not the subject's colour."""
    subject = world.render(dataclasses.replace(scene, background=scene.colour), side=1)[0, 0]
    return float(np.any(picture != subject, axis=-1).mean())


def rendered(scenes: list[world.Scene]) -> tuple[torch.Tensor, np.ndarray]:
    """The scenes as the CNNs see them (N, 3, 64, 64) uint8, and each picture's background share."""
    pictures = [world.render(scene) for scene in scenes]
    shares = np.array([background_share(s, p) for s, p in zip(scenes, pictures, strict=True)])
    return torch.from_numpy(np.stack([downscale(p) for p in pictures])), shares


def fit(
    net: WorldNet,
    inputs: torch.Tensor,
    loss_of: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    steps: int,
    seed: int,
    batch: int = 64,
    lr: float = 3e-3,
) -> list[float]:
    """Train `net` on random batches of `inputs` (flipped, noised); loss_of(outputs, indices)."""
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, lr, total_steps=steps, pct_start=0.1)
    net.train()
    losses, started = [], time.perf_counter()
    for step in range(steps):
        indices = torch.randint(len(inputs), (batch,), generator=generator)
        x = inputs[indices].float()
        flip = torch.rand(batch, generator=generator) < 0.5
        x = torch.where(flip[:, None, None, None], x.flip(3), x)
        sigma = torch.rand(batch, 1, 1, 1, generator=generator) * NOISE
        x = (x + torch.randn(x.shape, generator=generator) * sigma).clamp(0, 255)
        loss = loss_of(net(x), indices)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
        losses.append(loss.item())
        if (step + 1) % 250 == 0:
            log.info("step %d/%d loss %.4f (%.0f s)", step + 1, steps, np.mean(losses[-250:]),
                     time.perf_counter() - started)  # fmt: skip
    net.eval().requires_grad_(False)
    return losses


def quality_terms(scene: world.Scene) -> list[float]:
    """world.quality's terms, one per attribute: quality is their mean."""
    return [a.term(scene.value(a.name)) for a in world.ATTRIBUTES]


def build_quality(steps: int, seed: int = 0, samples: int = 8000) -> WorldNet:
    """The evaluation's aesthetic: regress world.quality of the true scene from the pixels, term by
    term (each attribute's closeness to its optimum) and as the terms' mean."""
    rng = np.random.default_rng(seed)
    scenes = draw_scenes(samples, rng)
    inputs, _ = rendered(scenes)
    terms = torch.tensor([quality_terms(s) for s in scenes], dtype=torch.float32)

    def loss_of(outputs: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        truth = terms[indices]
        return F.mse_loss(outputs, truth) + F.mse_loss(outputs.mean(dim=1), truth.mean(dim=1))

    torch.manual_seed(seed)
    net = quality_net()
    fit(net, inputs, loss_of, steps, seed)
    return net


def alignment_targets(scenes: list[world.Scene], shares: np.ndarray) -> list[torch.Tensor]:
    """Target distributions of the three heads: one-hot truth, uniform where the background is hidden."""
    truth = [
        [world.SHAPES.index(s.shape) for s in scenes],
        [COLOUR_NAMES.index(s.colour) for s in scenes],
        [COLOUR_NAMES.index(s.background) for s in scenes],
    ]
    hidden = torch.from_numpy(shares < HIDDEN_BACKGROUND)[:, None]
    targets = []
    for indices, classes in zip(
        truth, (len(world.SHAPES), len(COLOUR_NAMES), len(COLOUR_NAMES)), strict=True
    ):
        one_hot = F.one_hot(torch.tensor(indices), classes).float()
        targets.append(torch.where(hidden, torch.full_like(one_hot, 1.0 / classes), one_hot))
    return targets


def build_alignment(steps: int, seed: int = 0, samples: int = 8000) -> WorldNet:
    """The alignment net: shape, colour and background heads trained with cross-entropy."""
    rng = np.random.default_rng(seed)
    scenes = draw_scenes(samples, rng)
    inputs, shares = rendered(scenes)
    targets = alignment_targets(scenes, shares)

    def loss_of(outputs: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        heads = split_heads(outputs)
        return sum(F.cross_entropy(h, t[indices]) for h, t in zip(heads, targets, strict=True)) / len(heads)

    torch.manual_seed(seed)
    net = alignment_net()
    fit(net, inputs, loss_of, steps, seed)
    return net


def _prior_scenes(count: int, seed: int) -> list[world.Scene]:
    rng = np.random.default_rng(seed)
    ids = world.scenes()
    return [world.random_scene(*ids[rng.integers(len(ids))], rng) for _ in range(count)]


def _ranks(values: np.ndarray) -> np.ndarray:
    return np.argsort(np.argsort(values)).astype(np.float64)


def evaluate_quality(net: WorldNet, count: int = 1000, seed: int = 10_000) -> dict[str, float]:
    """Held-out fit on fresh renders from the prior: Pearson and Spearman correlation, MAE."""
    scenes = _prior_scenes(count, seed)
    inputs, _ = rendered(scenes)
    truth = np.array([world.quality(s) for s in scenes])
    with torch.inference_mode():
        predicted = net(inputs).mean(dim=1).clamp(0, 1).double().numpy()
    return {
        "pearson": float(np.corrcoef(truth, predicted)[0, 1]),
        "spearman": float(np.corrcoef(_ranks(truth), _ranks(predicted))[0, 1]),
        "mae": float(np.abs(truth - predicted).mean()),
        "label_std": float(truth.std()),
    }


def evaluate_alignment(net: WorldNet, count: int = 1000, seed: int = 10_000) -> dict[str, float]:
    """Held-out accuracy of each head on fresh renders from the prior."""
    scenes = _prior_scenes(count, seed)
    inputs, shares = rendered(scenes)
    truth = alignment_targets(scenes, shares)
    with torch.inference_mode():
        heads = split_heads(net(inputs))
    return {
        f"{name}_accuracy": float((h.argmax(1) == t.argmax(1)).double().mean())
        for name, h, t in zip(("shape", "colour", "background"), heads, truth, strict=True)
    }
