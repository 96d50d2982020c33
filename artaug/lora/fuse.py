"""Fusing LoRA files into weights: the one place where a LoRA's delta is added to a model.

A fused layer's weight is one fixed function of its pristine weight and the files' factors:

    W = cast(float32(W0) + sum over files, then over rank j, of (s * B[:, j]) (x) A[j, :])

computed one rank-1 term at a time, each an elementwise multiply followed by a separate add, in
float32, and cast to the layer's dtype once. IEEE rounds each multiply and add exactly, and no matmul
(whose blocking depends on the thread count) or fused multiply-add is involved, so the bits do not
depend on the thread count or the device. Every path that fuses (loading a model, a warm host moving
to round k's model, training's LoRA-1 merge, `artaug fuse`) goes through `FusedWeights`, so a host's
weights and a fresh load of the same model are the same bits. Weights are always set from the
pristine copy, never unfused: in bf16, unfusing does not give W0 back.

Files are read by `lora.algebra.read_component_factors` (diffusers' converters, the adapter's alpha
and rank); each is checked first for NaN or inf values and against the model's layers, because a key
that matches no layer would otherwise be dropped without a word.
"""

from __future__ import annotations

import torch
from peft.tuners.tuners_utils import BaseTunerLayer

from artaug.lora.algebra import read_component_factors
from artaug.lora.files import LoraFileError, check_finite, check_fits, local_copy

Terms = dict[tuple[str, str], list[tuple[torch.Tensor, torch.Tensor]]]  # (component, layer) -> [(A, sB)]


def lora_terms(paths: list[str], scale: float, components: dict[str, torch.nn.Module]) -> Terms:
    """The float32 factors (A, scale * alpha/rank * B) of every file, per layer, in file order."""
    terms: Terms = {}
    for path in paths:
        local = local_copy(path)
        check_finite(local)
        check_fits(local, components)
        for component, layers in read_component_factors(local).items():
            for layer, (down, up) in layers.items():
                terms.setdefault((component, layer), []).append((down.float(), (up * scale).float()))
    return terms


def fused_weight(base: torch.Tensor, terms: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
    """`base` plus the terms' deltas, in float32 one rank-1 term at a time, cast to base's dtype once."""
    total = base.to(torch.float32, copy=True)
    for down, up in terms:
        down, up = down.to(total.device), up.to(total.device)
        for j in range(down.shape[0]):
            total.add_(torch.mul(up[:, j : j + 1], down[j : j + 1, :]))
    return total.to(base.dtype)


class FusedWeights:
    """The LoRA-fused weights of named modules ({"transformer": ..., "text_encoder": ...}), set in
    place from their pristine values. A layer's pristine weight is copied (to host memory) the first
    time a file touches it; a layer no file touches any more gets its pristine bits back."""

    def __init__(self, components: dict[str, torch.nn.Module]):
        self.components = {name: module for name, module in components.items() if module is not None}
        self.modules = {name: dict(module.named_modules()) for name, module in self.components.items()}
        self.pristine: dict[tuple[str, str], torch.Tensor] = {}
        self.loras: list[str] = []
        self.scale = 1.0

    def set(self, loras: list[str], scale: float = 1.0) -> bool:
        """Give every layer the weights of the pristine model with `loras` fused at `scale`, in order.
        Returns False (and changes nothing) when they are already what the modules hold."""
        if list(loras) == self.loras and scale == self.scale:
            return False
        terms = lora_terms(list(loras), scale, self.components)
        with torch.no_grad():
            for key in [*terms, *(k for k in self.pristine if k not in terms)]:
                weight = self._weight(key)
                if key not in self.pristine:
                    self.pristine[key] = weight.detach().to("cpu", copy=True)
                weight.copy_(fused_weight(self.pristine[key].to(weight.device), terms.get(key, [])))
        self.loras, self.scale = list(loras), scale
        return True

    def _weight(self, key: tuple[str, str]) -> torch.Tensor:
        component, layer = key
        module = self.modules[component].get(layer)
        module = getattr(module, "base_layer", module)
        if not isinstance(module, torch.nn.Linear):
            raise LoraFileError(f"{component}.{layer}: no Linear layer to fuse into")
        return module.weight


def fuse_into_transformer(transformer, path: str, scale: float = 1.0) -> None:
    """Add one LoRA file's delta to a bare FLUX transformer's current weights (its LoRA-1 merge)."""
    FusedWeights({"transformer": transformer}).set([path], scale)


def lora_layers(model: torch.nn.Module) -> list[str]:
    """Names of peft LoRA layers or LoRA parameters left in `model` (empty for plain weights)."""
    names = [n for n, m in model.named_modules() if isinstance(m, BaseTunerLayer)]
    return names + [n for n, _ in model.named_parameters() if "lora_" in n]
