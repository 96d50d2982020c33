"""The synthesis model (a FLUX pipeline): which weights a run means, and loading them.

`source` is a hub id, a local folder written by save_pretrained, or built in code: "tiny", "world" or
"flux-dev-shapes" (FLUX.1-dev's widths, depth cut, saved once into `cache_dir`: models/flux_shapes.py). A
local folder is read with local_files_only, so it never touches the network; a missing one fails
before Ray starts (`check_source`), naming the path. The LoRAs of `ModelConfig.loras` are fused in
order on load (`lora.fuse.FusedWeights`, from the pristine weights); which LoRAs a model carries is
`artaug.models.lineage`'s.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Callable
from typing import Protocol

import torch
from diffusers import FluxPipeline, FluxTransformer2DModel

import artaug.models.patch_vae  # noqa: F401  (diffusers resolves the tiny patch VAE's class from imported modules)
from artaug.config import ModelConfig
from artaug.errors import ArtaugError
from artaug.hub import BUILT_IN_MODELS, looks_local
from artaug.lora.fuse import FusedWeights, lora_layers
from artaug.models import flux_shapes
from artaug.models.tiny import build_tiny_flux
from artaug.models.world_flux import build_world_flux

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class ModelSourceError(ArtaugError, FileNotFoundError):
    """A model folder or LoRA file does not exist or is not a diffusers pipeline."""


def check_source(cfg: ModelConfig) -> None:
    """Fail fast, before any worker starts, on a missing local model folder or LoRA file."""
    if cfg.source not in BUILT_IN_MODELS and looks_local(cfg.source):
        folder = os.path.expanduser(cfg.source)
        if not os.path.isdir(folder):
            raise ModelSourceError(f"model.source: folder {folder!r} does not exist")
        if not os.path.isfile(os.path.join(folder, "model_index.json")):
            raise ModelSourceError(
                f"model.source: {folder!r} has no model_index.json (not a diffusers pipeline folder;"
                " build one with `artaug models build-tiny DIR` or save_pretrained)"
            )
    for lora in cfg.loras:
        if "://" not in lora and not os.path.isfile(os.path.expanduser(lora)):
            raise ModelSourceError(f"model.loras: file {lora!r} does not exist")


def pick_device(cfg: ModelConfig) -> torch.device:
    """The device this process computes on, from torch itself (not from Ray's GPU assignment)."""
    if cfg.device == "cuda" or (cfg.device == "auto" and torch.cuda.is_available()):
        return torch.device("cuda")
    return torch.device("cpu")


def pick_dtype(cfg: ModelConfig, device: torch.device) -> torch.dtype:
    if cfg.dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return DTYPES[cfg.dtype]


def _from_source(cls, cfg: ModelConfig, dtype: torch.dtype, **kwargs):
    """`cls.from_pretrained` for a local folder (never the network) or a hub id at the pinned revision."""
    if looks_local(cfg.source):
        return cls.from_pretrained(
            os.path.expanduser(cfg.source), dtype=dtype, local_files_only=True, **kwargs
        )
    return cls.from_pretrained(cfg.source, dtype=dtype, revision=cfg.revision or None, **kwargs)


def _saved_once(cfg: ModelConfig) -> ModelConfig:
    """cfg reading "flux-dev-shapes" from its folder under cfg.cache_dir (built there on first use)."""
    folder = flux_shapes.cached_flux_dev_shapes(cfg.cache_dir, cfg.tiny_seed)
    return dataclasses.replace(cfg, source=folder, revision="")


def _built_in_pipeline(cfg: ModelConfig, dtype: torch.dtype):
    """The "tiny" random pipeline or the miniature world's pretrained one, built in memory; the
    FLUX.1-dev-shaped one read from the folder it was saved to once."""
    if cfg.source == flux_shapes.SOURCE:
        return _from_source(FluxPipeline, _saved_once(cfg), dtype)
    pipe = build_world_flux() if cfg.source == "world" else build_tiny_flux(cfg.tiny_seed)
    return pipe if dtype == torch.float32 else pipe.to(dtype=dtype)


def load_pipeline(cfg: ModelConfig, device: torch.device | None = None):
    """The FLUX pipeline on `device` with cfg.loras fused in order and no LoRA layers left."""
    pipe, weights = load_synthesis(cfg, device)
    weights.set(cfg.loras, cfg.lora_scale)
    return pipe


def load_synthesis(cfg: ModelConfig, device: torch.device | None = None) -> tuple:
    """(the pipeline of cfg's source without LoRAs, the FusedWeights that set its LoRAs in place):
    what a warm host keeps for a whole run, moving from round to round with `weights.set`."""
    check_source(cfg)
    device = device or pick_device(cfg)
    dtype = pick_dtype(cfg, device)
    pipe = (
        _built_in_pipeline(cfg, dtype)
        if cfg.source in BUILT_IN_MODELS
        else _from_source(FluxPipeline, cfg, dtype)
    )
    pipe = _ready(pipe, device)
    return pipe, FusedWeights({"transformer": pipe.transformer, "text_encoder": pipe.text_encoder})


class ModelCache(Protocol):
    """What a warm host offers its work classes (`artaug.stages.hosts.ModelHost`)."""

    def cached(self, kind: str, key: str, build: Callable): ...

    def count(self, name: str) -> None: ...


def host_pipeline(host: ModelCache | None, model: ModelConfig):
    """The pipeline of `model`: on a host, its one pipeline of that base model with `model.loras` set
    in place (`lora.fuse.FusedWeights`: the bits of a fresh load); without a host, a fresh load."""
    if host is None:
        return load_pipeline(model)
    base = dataclasses.replace(model, loras=[], lora_scale=1.0)
    pipe, weights = host.cached("synthesis", repr(base), lambda: load_synthesis(base))
    if weights.set(model.loras, model.lora_scale):
        host.count("weight_sets")
    return pipe


def load_transformer(cfg: ModelConfig, device: torch.device, dtype: torch.dtype):
    """The FLUX transformer alone, with cfg.loras fused in order: the base a training round starts from."""
    check_source(cfg)
    if cfg.source == flux_shapes.SOURCE:
        transformer = _from_source(FluxTransformer2DModel, _saved_once(cfg), dtype, subfolder="transformer")
    elif cfg.source in BUILT_IN_MODELS:
        transformer = _built_in_pipeline(cfg, torch.float32).transformer
    else:
        transformer = _from_source(FluxTransformer2DModel, cfg, dtype, subfolder="transformer")
    if transformer.dtype != dtype:  # (a no-op cast still warns about modules kept in float32)
        transformer = transformer.to(dtype=dtype)
    transformer = transformer.to(device)
    if device.type == "cpu":
        _own_aligned_memory(transformer)
    FusedWeights({"transformer": transformer}).set(cfg.loras, cfg.lora_scale)
    return transformer


def save_fused(cfg: ModelConfig, out: str) -> dict:
    """`artaug fuse`: the model of `cfg` (its LoRAs fused) saved as a plain diffusers folder at `out`."""
    pipe = load_pipeline(dataclasses.replace(cfg, device="cpu"))
    left = [n for c in pipe.components.values() if isinstance(c, torch.nn.Module) for n in lora_layers(c)]
    if left:  # anything left would be served as a slower model
        raise RuntimeError(f"LoRA layers left after fusing: {left[:4]}")
    pipe.save_pretrained(out, safe_serialization=True)
    record = {"base": cfg.source, "loras": list(cfg.loras), "scale": cfg.lora_scale}
    with open(os.path.join(out, "fused_loras.json"), "w") as f:
        json.dump(record, f, indent=1)
    return record


def _ready(pipe, device: torch.device):
    pipe.set_progress_bar_config(disable=True)
    if device.type == "cpu":
        for component in pipe.components.values():
            if isinstance(component, torch.nn.Module):
                _own_aligned_memory(component)
    return pipe.to(device)


def _own_aligned_memory(module: torch.nn.Module) -> None:
    """Copy memory-mapped weights into fresh tensors.

    safetensors maps weights at arbitrary byte offsets, and CPU matmul kernels round differently on
    unaligned memory: without the copy a reloaded model's images differ from the in-memory model's
    in the last bits. Fresh allocations are aligned, so outputs are byte-identical.
    """
    for tensor in [*module.parameters(), *module.buffers()]:
        tensor.data = tensor.data.clone()
