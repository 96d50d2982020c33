"""Fusing LoRA files into weights: the one place where a LoRA's delta is added to a model.

Fusing adds scale * B @ A to each layer's weight and removes the LoRA layers, so a fused model costs
what the base model costs. Files go through diffusers' pipeline-level reader, which returns the
adapter metadata (alpha / rank); every file is checked first for NaN or inf values, and against the
model's layers, because diffusers skips keys that match no layer with only a warning.
"""

from __future__ import annotations

import torch
from diffusers import FluxPipeline
from peft.tuners.tuners_utils import BaseTunerLayer

from artaug.lora.files import check_finite, check_fits, local_copy


def fuse_into_pipeline(pipe, loras: list[str], scale: float = 1.0) -> None:
    """Fuse each LoRA file into a FLUX pipeline one after another, then drop the LoRA layers."""
    for index, path in enumerate(loras):
        name = f"fused_{index}"
        local = local_copy(path)
        check_finite(local)
        check_fits(local, {"transformer": pipe.transformer, "text_encoder": pipe.text_encoder})
        pipe.load_lora_weights(local, adapter_name=name)
        pipe.fuse_lora(adapter_names=[name], lora_scale=scale)
        pipe.unload_lora_weights()


def fuse_into_transformer(transformer, path: str, scale: float = 1.0, name: str = "fused") -> None:
    """Fuse a LoRA file into a bare FLUX transformer's weights, then remove its layers.

    The transformer's own `load_lora_adapter(path)` ignores the saved alpha and would apply
    alpha == rank, hence the pipeline-level reader.
    """
    check_finite(path)
    check_fits(path, {"transformer": transformer})
    state, alphas, metadata = FluxPipeline.lora_state_dict(
        local_copy(path), return_alphas=True, return_lora_metadata=True
    )
    FluxPipeline.load_lora_into_transformer(
        state, network_alphas=alphas, transformer=transformer, adapter_name=name, metadata=metadata
    )
    transformer.fuse_lora(lora_scale=scale, adapter_names=[name])
    transformer.unload_lora()


def lora_layers(model: torch.nn.Module) -> list[str]:
    """Names of peft LoRA layers or LoRA parameters left in `model` (empty for plain weights)."""
    names = [n for n, m in model.named_modules() if isinstance(m, BaseTunerLayer)]
    return names + [n for n, _ in model.named_parameters() if "lora_" in n]
