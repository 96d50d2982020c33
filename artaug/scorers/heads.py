"""MLP scoring heads on image embeddings, rebuilt from their state dict.

The LAION improved aesthetic predictor (keys `layers.{0,2,4,6,7}`) and the SigLIP aesthetic predictor
v2.5 (keys `scoring_head.{0,2,4,6,8}`) are both stacks of Linear layers with dropout between and no
activation, on L2-normalised embeddings. `LinearStackHead` infers the layer sizes and order from
the keys, so either file loads without knowing its exact layout, and a file of another shape is
refused with the mismatch named.
"""

from __future__ import annotations

import re

import torch
from torch import nn

from artaug.scorers.base import ScorerWeightsError, load_state_dict

_KEY = re.compile(r"^(?P<prefix>.*?)(?P<index>\d+)\.(?P<kind>weight|bias)$")


class LinearStackHead(nn.Module):
    """Linear layers applied in sequence (dropout is a no-op at inference)."""

    def __init__(self, sizes: list[int]):
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(sizes, sizes[1:], strict=False))

    def forward(self, embeddings: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            embeddings = layer(embeddings)
        return embeddings.squeeze(-1)

    @property
    def input_size(self) -> int:
        return self.layers[0].in_features


def random_head(input_size: int, seed: int) -> LinearStackHead:
    """A tiny head in the LAION shape (a few linear layers down to one output)."""
    torch.manual_seed(seed)
    return LinearStackHead([input_size, 16, 8, 1]).eval()


def head_state_dict(head: LinearStackHead, prefix: str = "layers.") -> dict[str, torch.Tensor]:
    """The head's weights under `prefix` with LAION-style spaced indices (0, 2, 4, ...)."""
    out = {}
    for i, layer in enumerate(head.layers):
        out[f"{prefix}{2 * i}.weight"] = layer.weight.detach().clone()
        out[f"{prefix}{2 * i}.bias"] = layer.bias.detach().clone()
    return out


def load_head(path: str, input_size: int) -> LinearStackHead:
    """The head stored at `path`, checked against the backbone's embedding size."""
    tensors = load_state_dict(path)
    layers: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        match = _KEY.match(key)
        if not match:
            raise ScorerWeightsError(f"{path!r}: unexpected key {key!r} for a linear-stack head")
        layers.setdefault(int(match["index"]), {})[match["kind"]] = value
    ordered = [layers[i] for i in sorted(layers)]
    if not ordered or any("weight" not in p or p["weight"].ndim != 2 for p in ordered):
        raise ScorerWeightsError(f"{path!r}: not a stack of linear layers")
    sizes = [ordered[0]["weight"].shape[1]] + [p["weight"].shape[0] for p in ordered]
    for a, b in zip(ordered, ordered[1:], strict=False):
        if b["weight"].shape[1] != a["weight"].shape[0]:
            raise ScorerWeightsError(f"{path!r}: layer sizes do not chain ({sizes})")
    if sizes[0] != input_size or sizes[-1] != 1:
        raise ScorerWeightsError(
            f"{path!r}: head maps {sizes[0]} -> {sizes[-1]}, but the backbone embeds in {input_size} -> 1"
        )
    head = LinearStackHead(sizes)
    with torch.no_grad():
        for layer, params in zip(head.layers, ordered, strict=True):
            layer.weight.copy_(params["weight"])
            if "bias" in params:
                layer.bias.copy_(params["bias"])
            else:
                layer.bias.zero_()
    return head.eval()
