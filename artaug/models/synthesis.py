"""Load the synthesis model (a FLUX pipeline) and fuse a list of LoRAs into its weights.

`source` is a hub id, a local folder written by save_pretrained, or "tiny". A local folder is read
with local_files_only, so it never touches the network; a missing one fails before Ray starts
(`check_source`), naming the path.
"""

from __future__ import annotations

import os

import torch

from artaug.config import ModelConfig

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class ModelSourceError(FileNotFoundError):
    """A model folder or LoRA file does not exist or is not a diffusers pipeline."""


def _register_custom_components() -> None:
    """diffusers resolves a component class saved from outside its libraries (the tiny patch VAE) from
    the modules already imported, so import them before reading a local folder."""
    import artaug.models.patch_vae  # noqa: F401


def looks_local(source: str) -> bool:
    """A path (absolute, relative with ./ or ../, ~, or existing) rather than a hub id."""
    return (
        source.startswith(("/", "./", "../", "~"))
        or os.path.exists(os.path.expanduser(source))
        or source.count("/") > 1
    )


def check_source(cfg: ModelConfig) -> None:
    """Fail fast, before any worker starts, on a missing local model folder or LoRA file."""
    if cfg.source != "tiny" and looks_local(cfg.source):
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


def load_pipeline(cfg: ModelConfig, device: torch.device | None = None):
    """The FLUX pipeline on `device` with cfg.loras fused in order and no LoRA layers left."""
    from diffusers import FluxPipeline

    check_source(cfg)
    device = device or pick_device(cfg)
    dtype = pick_dtype(cfg, device)
    if cfg.source == "tiny":
        from artaug.models.tiny import build_tiny_flux

        pipe = build_tiny_flux(cfg.tiny_seed)
        if dtype != torch.float32:
            pipe = pipe.to(dtype=dtype)
    elif looks_local(cfg.source):
        _register_custom_components()
        pipe = FluxPipeline.from_pretrained(
            os.path.expanduser(cfg.source), dtype=dtype, local_files_only=True
        )
    else:
        pipe = FluxPipeline.from_pretrained(cfg.source, dtype=dtype, revision=cfg.revision or None)
    fuse_loras(pipe, cfg.loras, cfg.lora_scale)
    pipe.set_progress_bar_config(disable=True)
    if device.type == "cpu":
        _own_aligned_memory(pipe)
    return pipe.to(device)


def _own_aligned_memory(pipe) -> None:
    """Copy memory-mapped weights into fresh tensors.

    safetensors maps weights at arbitrary byte offsets, and CPU matmul kernels round differently on
    unaligned memory: without the copy a reloaded model's images differ from the in-memory model's
    in the last bits. Fresh allocations are aligned, so outputs are byte-identical.
    """
    for component in pipe.components.values():
        if isinstance(component, torch.nn.Module):
            for tensor in [*component.parameters(), *component.buffers()]:
                tensor.data = tensor.data.clone()


def fuse_loras(pipe, loras: list[str], scale: float = 1.0) -> None:
    """Fuse each LoRA into the weights one after another, then drop the LoRA layers.

    A file whose keys match no layer of the model is refused (diffusers would skip them with a warning).
    """
    from artaug.lora import check_fits

    for index, path in enumerate(loras):
        name = f"fused_{index}"
        local = _local_copy(path)
        check_fits(local, {"transformer": pipe.transformer, "text_encoder": pipe.text_encoder})
        pipe.load_lora_weights(local, adapter_name=name)
        pipe.fuse_lora(adapter_names=[name], lora_scale=scale)
        pipe.unload_lora_weights()


def _local_copy(path: str) -> str:
    """LoRA files on object stores are fetched to a local temp file for diffusers."""
    if "://" not in path:
        return os.path.expanduser(path)
    import tempfile

    from artaug.storage import read_bytes

    handle = tempfile.NamedTemporaryFile(suffix=".safetensors", delete=False)
    with handle:
        handle.write(read_bytes(path))
    return handle.name


def load_encoders(cfg: ModelConfig, device: torch.device | None = None):
    """The FLUX pipeline without its transformer (VAE, CLIP, T5): what the latent cache needs."""
    from diffusers import FluxPipeline

    check_source(cfg)
    device = device or pick_device(cfg)
    dtype = pick_dtype(cfg, device)
    if cfg.source == "tiny":
        from artaug.models.tiny import build_tiny_flux

        pipe = build_tiny_flux(cfg.tiny_seed)
        pipe.transformer = None
        if dtype != torch.float32:
            pipe = pipe.to(dtype=dtype)
    else:
        local = looks_local(cfg.source)
        _register_custom_components()
        pipe = FluxPipeline.from_pretrained(
            os.path.expanduser(cfg.source) if local else cfg.source,
            transformer=None,
            dtype=dtype,
            local_files_only=local,
            revision=None if local else (cfg.revision or None),
        )
    pipe.set_progress_bar_config(disable=True)
    if device.type == "cpu":
        _own_aligned_memory(pipe)
    return pipe.to(device)


def load_transformer(cfg: ModelConfig, device: torch.device, dtype: torch.dtype):
    """The FLUX transformer alone, with cfg.loras fused in order: the base a training round starts from."""
    from diffusers import FluxTransformer2DModel

    from artaug.lora import fuse_into_transformer

    check_source(cfg)
    if cfg.source == "tiny":
        from artaug.models.tiny import build_tiny_flux

        transformer = build_tiny_flux(cfg.tiny_seed).transformer
    else:
        local = looks_local(cfg.source)
        transformer = FluxTransformer2DModel.from_pretrained(
            os.path.expanduser(cfg.source) if local else cfg.source,
            subfolder="transformer",
            dtype=dtype,
            local_files_only=local,
            revision=None if local else (cfg.revision or None),
        )
    if transformer.dtype != dtype:  # (a no-op cast still warns about modules kept in float32)
        transformer = transformer.to(dtype=dtype)
    transformer = transformer.to(device)
    for index, path in enumerate(cfg.loras):
        fuse_into_transformer(transformer, path, cfg.lora_scale, name=f"fused_{index}")
    if device.type == "cpu":  # see _own_aligned_memory
        for tensor in [*transformer.parameters(), *transformer.buffers()]:
            tensor.data = tensor.data.clone()
    return transformer
