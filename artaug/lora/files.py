"""LoRA files: write them in the layout diffusers' `FluxPipeline.load_lora_weights` reads, with our
metadata; check a file's keys against the model, and its values for NaN or inf, before it is fused.
Fusing: `artaug.lora.fuse`; combining rounds: `artaug.lora.algebra`; other key layouts: `artaug.lora.export`.

A file we write holds the transformer's `lora_A` / `lora_B` weights under diffusers' key names, the
peft adapter config (so loaders apply alpha / rank, not 1) under diffusers' metadata key, and our
own metadata (base model, round, rank, alpha, mode, config hash) as JSON under `artaug`.
"""

from __future__ import annotations

import json
import os
import tempfile

import torch
from diffusers import FluxPipeline
from safetensors import safe_open
from safetensors.torch import load, save_file

from artaug import storage
from artaug.errors import ArtaugError
from artaug.layout import WEIGHT_NAME

METADATA_KEY = "artaug"
_LORA_TAILS = ("lora_A.weight", "lora_B.weight", "lora_B.bias")


class LoraFileError(ArtaugError, ValueError):
    """A LoRA file is unreadable or holds keys that do not fit the model; the message names them."""


def save_lora(path: str, lora_weights: dict[str, torch.Tensor], lora_config, metadata: dict) -> None:
    """Write `lora_weights` (peft names, no prefix) to `path` (local or URI); diffusers layout + metadata."""
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
    with safe_open(local_copy(path), framework="pt") as f:
        return json.loads((f.metadata() or {}).get(METADATA_KEY, "{}"))


def check_fits(path: str, components: dict[str, torch.nn.Module]) -> None:
    """Raise LoraFileError naming every key of the file that matches no Linear layer of `components`.

    `components` maps a key prefix to a model ({"transformer": pipe.transformer, ...}). Keys are
    checked after diffusers' own format conversion, so files in formats diffusers reads pass.
    """
    try:
        state = FluxPipeline.lora_state_dict(local_copy(path))
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


def local_copy(path: str) -> str:
    """A local file for `path`; object-store files are fetched to a temp file (safetensors needs a file)."""
    if not storage.is_uri(path):
        return os.path.expanduser(path)
    handle = tempfile.NamedTemporaryFile(suffix=".safetensors", delete=False)
    with handle:
        handle.write(storage.read_bytes(path))
    return handle.name


def check_finite(path: str) -> dict[str, torch.Tensor]:
    """The file's tensors; LoraFileError when any holds NaN or inf (a diverged training). Every path
    that reads a LoRA checks it: fusing (generate, `artaug fuse`, serving), combining, training."""
    try:
        data = storage.read_bytes(path)
    except FileNotFoundError:
        raise LoraFileError(f"LoRA file {path}: does not exist") from None
    return check_finite_bytes(data, path)


def check_finite_bytes(data: bytes, path: str) -> dict[str, torch.Tensor]:
    """`check_finite` for a file's bytes already read; `path` names it in the error."""
    try:
        tensors = load(data)
    except Exception as err:  # noqa: BLE001 - any reader failure means the file is not safetensors
        raise LoraFileError(f"LoRA file {path}: unreadable ({type(err).__name__}: {err})") from None
    bad = sorted(key for key, tensor in tensors.items() if not tensor.isfinite().all())
    if bad:
        raise LoraFileError(
            f"{path}: {len(bad)} tensor(s) hold NaN or inf (training diverged; e.g. lower"
            f" train.learning_rate), first: {bad[0]}"
        )
    return tensors
