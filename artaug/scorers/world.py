"""The miniature world's scorers: the filter's aesthetic, the evaluation's aesthetic, and alignment.

- `world_aesthetic` (the filter's): hand-written, `world.quality` of what `world.measure` reads off
  the pixels, given the scene the prompt names.
- `world_quality` (the evaluation's): a different function of the pixels only, a small CNN trained
  on rendered pictures labelled with `world.quality` of their true scene. The filter and the
  evaluation share no code path, so the loop cannot win the evaluation by fitting the filter's
  measurement errors.
- `world_alignment`: a small CNN with three heads (shape, subject colour, background colour) trained
  on rendered scenes; the score is the mean probability of the three the prompt names. A frame the
  subject fills leaves no background to see, so it scores low.

Both CNNs ship as package data (artaug/scorers/world/*.safetensors), built by
`scripts/build_world_scorers.py` (artaug/scorers/world_training.py).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from importlib import resources

import numpy as np
import torch
from PIL import Image
from safetensors.torch import load_file

from artaug import world
from artaug.config import ScorersConfig
from artaug.scorers.base import Scorer, ScorerWeightsError, to_numpy

INPUT = 64  # the CNNs see pictures downscaled to 64x64
QUALITY_WEIGHTS = "world/quality.safetensors"
ALIGNMENT_WEIGHTS = "world/alignment.safetensors"
HEADS = (("shape", len(world.SHAPES)), ("colour", len(world.COLOURS)), ("background", len(world.COLOURS)))
COLOUR_NAMES = tuple(world.COLOURS)


class WorldNet(torch.nn.Module):
    """Four strided 3x3 convolutions (batch-normalised) over RGB plus two coordinate channels, then
    a two-layer head on the global mean and max of the last 4x4 map and the map itself: the head can
    compare the frame's border with its middle, which a subject's size and placement are read from."""

    def __init__(self, outputs: int, width: int = 32):
        super().__init__()
        channels = (5, 16, 32, width, width)
        layers: list[torch.nn.Module] = []
        for c_in, c_out in zip(channels, channels[1:], strict=False):
            layers += [torch.nn.Conv2d(c_in, c_out, 3, stride=2, padding=1), torch.nn.BatchNorm2d(c_out)]
            layers.append(torch.nn.ReLU())
        self.features = torch.nn.Sequential(*layers)
        cells = (INPUT // 16) ** 2
        self.head = torch.nn.Sequential(
            torch.nn.Linear((2 + cells) * width, 64), torch.nn.ReLU(), torch.nn.Linear(64, outputs)
        )
        axis = torch.linspace(-1, 1, INPUT)
        grid = torch.stack(torch.meshgrid(axis, axis, indexing="ij"))
        self.register_buffer("coords", grid[None], persistent=False)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        """pixels: (N, 3, INPUT, INPUT) uint8 or float in 0..255."""
        x = pixels.float() / 255.0 - 0.5
        x = torch.cat([x, self.coords.expand(len(x), -1, -1, -1)], dim=1)
        maps = self.features(x)
        return self.head(torch.cat([maps.mean(dim=(2, 3)), maps.amax(dim=(2, 3)), maps.flatten(1)], dim=1))


def downscale(image: Image.Image | np.ndarray) -> np.ndarray:
    """(3, INPUT, INPUT) uint8: what the CNNs see of a picture (training and scoring alike)."""
    if isinstance(image, np.ndarray):
        image = Image.fromarray(image)
    small = image.convert("RGB").resize((INPUT, INPUT), Image.Resampling.BILINEAR)
    return np.asarray(small, dtype=np.uint8).transpose(2, 0, 1)


def batch_tensor(images: Sequence[Image.Image | np.ndarray]) -> torch.Tensor:
    return torch.from_numpy(np.stack([downscale(image) for image in images]))


def quality_net() -> WorldNet:
    """Outputs one estimate per term of world.quality (one per attribute); the score is their mean."""
    return WorldNet(len(world.ATTRIBUTES))


def alignment_net() -> WorldNet:
    return WorldNet(sum(n for _, n in HEADS))


def split_heads(logits: torch.Tensor) -> list[torch.Tensor]:
    """The alignment net's logits as (shape, colour, background) logits."""
    return list(torch.split(logits, [n for _, n in HEADS], dim=1))


WEIGHTS = {"world_quality": QUALITY_WEIGHTS, "world_alignment": ALIGNMENT_WEIGHTS}


def weights_path(relative: str) -> str:
    return str(resources.files("artaug.scorers").joinpath(relative))


def check_weights(name: str) -> None:
    """Before Ray starts: the shipped weights of scorer `name` are there."""
    path = weights_path(WEIGHTS[name])
    if not os.path.isfile(path):
        raise ScorerWeightsError(
            f"{name}: the weights file {path!r} is missing; "
            "build it with `python scripts/build_world_scorers.py`"
        )


def load_net(net: WorldNet, name: str, device: torch.device | None = None) -> WorldNet:
    """`net` with the shipped weights of scorer `name`, in eval mode."""
    check_weights(name)
    net.load_state_dict(load_file(weights_path(WEIGHTS[name])))
    return net.to(device or torch.device("cpu")).eval().requires_grad_(False)


class WorldAesthetic(Scorer):
    """The filter's aesthetic: the world's taste of the attributes measured from the pixels."""

    name = "world_aesthetic"
    columns = ("world_aesthetic",)

    def __init__(self, cfg: ScorersConfig | None = None, device=None):
        pass

    def score(self, images, prompts) -> dict[str, np.ndarray]:
        values = []
        for image, text in zip(images, prompts, strict=True):
            pixels = np.asarray(image.convert("RGB").resize((world.SIDE, world.SIDE)))
            values.append(world.quality(world.measure(pixels, text).scene))
        return {"world_aesthetic": np.array(values, dtype=np.float64)}


class WorldQuality(Scorer):
    """The evaluation's aesthetic: a CNN's estimate of the world's taste, from the pixels alone."""

    name = "world_quality"
    columns = ("world_quality",)

    def __init__(self, cfg: ScorersConfig | None = None, device=None):
        self.device = device or torch.device("cpu")
        self.net = load_net(quality_net(), self.name, self.device)

    def score(self, images, prompts) -> dict[str, np.ndarray]:
        with torch.inference_mode():
            values = self.net(batch_tensor(images).to(self.device)).mean(dim=1).clamp(0, 1)
        return {"world_quality": to_numpy(values)}


def alignment_probabilities(net: WorldNet, images, prompts, device=None) -> np.ndarray:
    """(N, 3): the probability of the prompt's own shape, colour and background (0 for a prompt that
    names no scene)."""
    with torch.inference_mode():
        heads = [h.softmax(dim=1) for h in split_heads(net(batch_tensor(images).to(device or "cpu")))]
    result = np.zeros((len(prompts), 3))
    for row, text in enumerate(prompts):
        named = world.parse(text)
        if named is None:
            continue
        shape, colour, background = named
        indices = (world.SHAPES.index(shape), COLOUR_NAMES.index(colour), COLOUR_NAMES.index(background))
        result[row] = [float(head[row, i]) for head, i in zip(heads, indices, strict=True)]
    return result


class WorldAlignment(Scorer):
    """Does the picture show the prompt's shape, colour and background? Mean of the three probabilities."""

    name = "world_alignment"
    columns = ("world_alignment",)

    def __init__(self, cfg: ScorersConfig | None = None, device=None):
        self.device = device or torch.device("cpu")
        self.net = load_net(alignment_net(), self.name, self.device)

    def score(self, images, prompts) -> dict[str, np.ndarray]:
        probabilities = alignment_probabilities(self.net, images, prompts, self.device)
        return {"world_alignment": probabilities.mean(axis=1)}
