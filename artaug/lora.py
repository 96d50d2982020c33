"""LoRA files: write them in the layout diffusers' `FluxPipeline.load_lora_weights` reads, with our
metadata; check a file's keys against the model before loading it; fuse one into a bare transformer.
Combining rounds and fusing to a folder: `artaug.lora_algebra`; kohya / ComfyUI keys: `artaug.lora_export`.

A file we write holds the transformer's `lora_A` / `lora_B` weights under diffusers' key names, the
peft adapter config (so loaders apply alpha / rank, not 1) under diffusers' metadata key, and our
own metadata (base model, round, rank, alpha, mode, config hash) as JSON under `artaug`.
"""

from __future__ import annotations

import json
import os
import tempfile

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from artaug import storage

WEIGHT_NAME = "pytorch_lora_weights.safetensors"  # diffusers' default name: load_lora_weights(folder)
METADATA_KEY = "artaug"
_LORA_TAILS = ("lora_A.weight", "lora_B.weight", "lora_B.bias")


class LoraFileError(ValueError):
    """A LoRA file is unreadable or holds keys that do not fit the model; the message names them."""


def save_lora(path: str, lora_weights: dict[str, torch.Tensor], lora_config, metadata: dict) -> None:
    """Write `lora_weights` (peft names, no prefix) to `path` (local or URI); diffusers layout + metadata."""
    from diffusers import FluxPipeline

    with tempfile.TemporaryDirectory() as tmp:
        weights = {k: v.detach().to("cpu").contiguous() for k, v in lora_weights.items()}
        # diffusers writes the keys and the adapter config in its own layout; we add our metadata.
        FluxPipeline.save_lora_weights(
            tmp, transformer_lora_layers=weights, transformer_lora_adapter_metadata=lora_config.to_dict()
        )
        written = os.path.join(tmp, WEIGHT_NAME)
        with safe_open(written, framework="pt") as f:
            header = dict(f.metadata() or {})
            tensors = {key: f.get_tensor(key) for key in f.keys()}
        header[METADATA_KEY] = json.dumps(metadata, sort_keys=True)
        save_file(tensors, written, metadata=header)
        with open(written, "rb") as f:
            storage.write_bytes(path, f.read())


def read_metadata(path: str) -> dict:
    """Our metadata of a LoRA file written by `save_lora` ({} for other files)."""
    with safe_open(_local(path), framework="pt") as f:
        return json.loads((f.metadata() or {}).get(METADATA_KEY, "{}"))


def check_fits(path: str, components: dict[str, torch.nn.Module]) -> None:
    """Raise LoraFileError naming every key of the file that matches no Linear layer of `components`.

    `components` maps a key prefix to a model ({"transformer": pipe.transformer, ...}). Keys are
    checked after diffusers' own format conversion, so files in formats diffusers reads pass.
    """
    from diffusers import FluxPipeline

    try:
        state = FluxPipeline.lora_state_dict(_local(path))
    except Exception as err:  # noqa: BLE001 - any reader failure means the file is not a LoRA we can load
        raise LoraFileError(f"LoRA file {path}: unreadable ({type(err).__name__}: {err})") from None
    modules = {prefix: dict(model.named_modules()) for prefix, model in components.items()}
    foreign = []
    for key, tensor in state.items():
        prefix, _, rest = key.partition(".")
        layer = next((rest[: -len(t) - 1] for t in _LORA_TAILS if rest.endswith("." + t)), None)
        module = modules.get(prefix, {}).get(layer) if layer else None
        module = getattr(module, "base_layer", module)  # a layer that already carries a LoRA
        if not isinstance(module, torch.nn.Linear) or not _shape_fits(key, tensor, module):
            foreign.append(key)
    if foreign:
        shown = ", ".join(foreign[:8]) + (f" ... ({len(foreign)} in all)" if len(foreign) > 8 else "")
        raise LoraFileError(
            f"LoRA file {path}: {len(foreign)} key(s) match no layer of the model ({'/'.join(components)}): "
            f"{shown}"
        )


def _shape_fits(key: str, tensor: torch.Tensor, module: torch.nn.Linear) -> bool:
    if key.endswith("lora_A.weight"):
        return tensor.ndim == 2 and tensor.shape[1] == module.in_features
    return tensor.shape[0] == module.out_features


def fuse_into_transformer(transformer, path: str, scale: float = 1.0, name: str = "fused") -> None:
    """Fuse a LoRA file into a bare FLUX transformer's weights, then remove its layers.

    The file goes through the pipeline-level reader, which returns the adapter metadata: the
    transformer's own `load_lora_adapter(path)` ignores it and would apply alpha == rank.
    """
    from diffusers import FluxPipeline

    check_fits(path, {"transformer": transformer})
    state, alphas, metadata = FluxPipeline.lora_state_dict(
        _local(path), return_alphas=True, return_lora_metadata=True
    )
    FluxPipeline.load_lora_into_transformer(
        state, network_alphas=alphas, transformer=transformer, adapter_name=name, metadata=metadata
    )
    transformer.fuse_lora(lora_scale=scale, adapter_names=[name])
    transformer.unload_lora()


def _local(path: str) -> str:
    """A local file for `path`; object-store files are fetched to a temp file (safetensors needs a file)."""
    if not storage.is_uri(path):
        return os.path.expanduser(path)
    handle = tempfile.NamedTemporaryFile(suffix=".safetensors", delete=False)
    with handle:
        handle.write(storage.read_bytes(path))
    return handle.name


# Algebra across rounds and other key layouts live in their own modules; importable from here too.
from artaug.lora_algebra import combine, fuse_to_folder, lora_layers, read_factors  # noqa: E402
from artaug.lora_export import export  # noqa: E402

__all__ = [
    "WEIGHT_NAME", "METADATA_KEY", "LoraFileError", "save_lora", "read_metadata", "check_fits",
    "fuse_into_transformer", "combine", "fuse_to_folder", "lora_layers", "read_factors", "export",
]  # fmt: skip
