"""LoRA key layouts other tools read: kohya-style (sd-scripts, `lora_unet_...`) and ComfyUI
(`diffusion_model.<name>`), both on the original FLUX checkpoint's layer names.

The original checkpoint fuses layers that diffusers keeps apart: q, k, v of an attention (and the MLP
input of a single block) are one `qkv` / `linear1` layer. Their LoRAs become one LoRA on the fused
layer: the A factors stacked, B block-diagonal (each part's rows only see its own rank slice), which
is exact. Reading back splits them again and drops parts that are all zero. Every file is written with
alpha == rank and the scale in the up factor.

    artaug lora export run/lora/combined.safetensors --format kohya --out flux-artaug.safetensors
"""

from __future__ import annotations

import json
import os
import re
import tempfile

import torch
from safetensors.torch import load_file, save_file

from artaug import storage
from artaug.lora.algebra import read_factors, write_adapter
from artaug.lora.files import METADATA_KEY, LoraFileError, local_copy

FORMATS = ("diffusers", "kohya", "comfyui")
_DOUBLE = {
    "attn.to_out.0": "img_attn.proj",
    "attn.to_add_out": "txt_attn.proj",
    "ff.net.0.proj": "img_mlp.0",
    "ff.net.2": "img_mlp.2",
    "ff_context.net.0.proj": "txt_mlp.0",
    "ff_context.net.2": "txt_mlp.2",
    "norm1.linear": "img_mod.lin",
    "norm1_context.linear": "txt_mod.lin",
}
_SINGLE = {"proj_out": "linear2", "norm.linear": "modulation.lin"}
_TOP = {
    "x_embedder": "img_in",
    "context_embedder": "txt_in",
    "proj_out": "final_layer.linear",
    "norm_out.linear": "final_layer.adaLN_modulation.1",
    "time_text_embed.timestep_embedder.linear_1": "time_in.in_layer",
    "time_text_embed.timestep_embedder.linear_2": "time_in.out_layer",
    "time_text_embed.guidance_embedder.linear_1": "guidance_in.in_layer",
    "time_text_embed.guidance_embedder.linear_2": "guidance_in.out_layer",
    "time_text_embed.text_embedder.linear_1": "vector_in.in_layer",
    "time_text_embed.text_embedder.linear_2": "vector_in.out_layer",
}
# Fused layers: (original name, diffusers parts in order).
_FUSED_DOUBLE = {"img_attn.qkv": ("attn.to_q", "attn.to_k", "attn.to_v"),
                 "txt_attn.qkv": ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj")}  # fmt: skip
_FUSED_SINGLE = {"linear1": ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp")}
SWAPPED = "final_layer.adaLN_modulation.1"  # the original orders (shift, scale), diffusers (scale, shift)


def original_name(layer: str) -> tuple[str, int | None]:
    """(original layer, part index within a fused layer or None) for a diffusers transformer layer."""
    if match := re.fullmatch(r"(single_)?transformer_blocks\.(\d+)\.(.+)", layer):
        single, index, rest = match.groups()
        block = f"{'single' if single else 'double'}_blocks.{index}."
        for fused, parts in (_FUSED_SINGLE if single else _FUSED_DOUBLE).items():
            if rest in parts:
                return block + fused, parts.index(rest)
        plain = (_SINGLE if single else _DOUBLE).get(rest)
        if plain:
            return block + plain, None
    elif layer in _TOP:
        return _TOP[layer], None
    raise LoraFileError(f"layer {layer!r} has no name in the original FLUX checkpoint layout")


def _part_rows(name: str, width: int) -> list[int]:
    """Output rows of each part of a fused layer; FLUX's q, k, v are `width` wide, its MLP 4x."""
    return [width] * 3 + ([4 * width] if name.endswith("linear1") else [])


def to_original(factors: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> dict[str, tuple]:
    """{original layer: (down, up)}; parts of a fused layer missing from `factors` are zero."""
    grouped: dict[str, dict] = {}
    for layer, (down, up) in factors.items():
        name, part = original_name(layer)
        if name == SWAPPED:
            up = torch.cat(up.chunk(2)[::-1])
        grouped.setdefault(name, {})[part] = (down, up)
    out = {}
    for name, parts in grouped.items():
        if None in parts:
            out[name] = parts[None]
            continue
        width = next(iter(parts.values()))[0].shape[1]
        rank = max(d.shape[0] for d, _ in parts.values())
        rows = _part_rows(name, width)
        down = torch.zeros(rank * len(rows), width, dtype=torch.float64)
        up = torch.zeros(sum(rows), rank * len(rows), dtype=torch.float64)
        for i, (d, u) in parts.items():
            first = sum(rows[:i])
            down[i * rank : i * rank + d.shape[0]] = d
            up[first : first + rows[i], i * rank : i * rank + d.shape[0]] = u
        out[name] = (down, up)
    return out


def from_original(factors: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> dict[str, tuple]:
    """The inverse of `to_original`: {diffusers layer: (A, B)}, all-zero parts dropped."""
    inverse = {name: layer for layer, name in _TOP.items()}
    out = {}
    for name, (down, up) in factors.items():
        block = re.fullmatch(r"(single|double)_blocks\.(\d+)\.(.+)", name)
        if block is None:
            if name not in inverse:
                raise LoraFileError(f"layer {name!r} is not a FLUX layer this exporter knows")
            out[inverse[name]] = (down, torch.cat(up.chunk(2)[::-1]) if name == SWAPPED else up)
            continue
        kind, index, rest = block.groups()
        prefix = f"{'single_' if kind == 'single' else ''}transformer_blocks.{index}."
        table = _SINGLE if kind == "single" else _DOUBLE
        plain = {v: k for k, v in table.items()}
        if rest in plain:
            out[prefix + plain[rest]] = (down, up)
            continue
        fused = _FUSED_SINGLE if kind == "single" else _FUSED_DOUBLE
        if rest not in fused:
            raise LoraFileError(f"layer {name!r} is not a FLUX layer this exporter knows")
        rows = _part_rows(name, down.shape[1])
        n = len(rows)
        blocks = up.split(rows)
        rank = down.shape[0] // n if down.shape[0] % n == 0 else None
        diagonal = rank is not None and all(
            not b[:, j * rank : (j + 1) * rank].any()
            for i, b in enumerate(blocks)
            for j in range(n)
            if j != i
        )
        for i, layer in enumerate(fused[rest]):
            # Block-diagonal (ours, sd-scripts' split q/k/v): each part keeps its rank slice; otherwise
            # every part shares the whole down factor.
            if diagonal:
                d, u = down[i * rank : (i + 1) * rank], blocks[i][:, i * rank : (i + 1) * rank]
            else:
                d, u = down, blocks[i]
            if u.any():
                out[prefix + layer] = (d, u)
    return out


def _keys(fmt: str, name: str) -> tuple[str, str, str]:
    stem = "lora_unet_" + name.replace(".", "_") if fmt == "kohya" else "diffusion_model." + name
    return f"{stem}.lora_down.weight", f"{stem}.lora_up.weight", f"{stem}.alpha"


def read_original(path: str) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """{original layer: (down, up * alpha / rank)} of a kohya or ComfyUI file."""
    state = load_file(local_copy(path))
    out = {}
    fmt = "kohya" if any(k.startswith("lora_unet_") for k in state) else "comfyui"
    names = _original_names() if fmt == "kohya" else None
    for key, down in state.items():
        if not key.endswith(".lora_down.weight"):
            continue
        stem = key.removesuffix(".lora_down.weight")
        name = (
            names.get(stem.removeprefix("lora_unet_"))
            if fmt == "kohya"
            else stem.removeprefix("diffusion_model.")
        )
        if name is None:
            raise LoraFileError(f"LoRA file {path}: key {key!r} is not a FLUX layer this exporter knows")
        up = state[f"{stem}.lora_up.weight"].double()
        alpha = state.get(f"{stem}.alpha", torch.tensor(float(down.shape[0]))).item()
        out[name] = (down.double(), up * alpha / down.shape[0])
    return out


def _original_names() -> dict[str, str]:
    """kohya's underscore names back to dotted original names (for blocks up to 64)."""
    names = list(_TOP.values())
    for i in range(64):
        names += [f"double_blocks.{i}.{n}" for n in [*_DOUBLE.values(), *_FUSED_DOUBLE]]
        names += [f"single_blocks.{i}.{n}" for n in [*_SINGLE.values(), *_FUSED_SINGLE]]
    return {n.replace(".", "_"): n for n in names}


def export(source: str, fmt: str, out: str) -> dict:
    """Rewrite the LoRA file `source` (any of FORMATS) in layout `fmt` at `out`; the delta is unchanged."""
    if fmt not in FORMATS:
        raise LoraFileError(f"export format must be one of {', '.join(FORMATS)} (got {fmt!r})")
    with open(local_copy(source), "rb") as f:
        header = json.loads(f.read(int.from_bytes(f.read(8), "little")))
    keys = [k for k in header if k != "__metadata__"]
    ours = json.loads((header.get("__metadata__") or {}).get(METADATA_KEY, "{}"))
    if any(k.startswith(("lora_unet_", "diffusion_model.")) for k in keys):
        factors = from_original(read_original(source))
    else:
        factors = read_factors(source)
    record = {**ours, "exported_from": source, "format": fmt}
    if fmt == "diffusers":
        rank = write_adapter(out, factors, record)
        return {"format": fmt, "layers": len(factors), "rank": rank, "out": out}
    tensors = {}
    for name, (down, up) in to_original(factors).items():
        down_key, up_key, alpha_key = _keys(fmt, name)
        tensors[down_key] = down.float().contiguous()
        tensors[up_key] = up.float().contiguous()
        tensors[alpha_key] = torch.tensor(float(down.shape[0]))  # alpha == rank: the scale is in `up`
    local = _local_out(out)
    save_file(tensors, local, metadata={METADATA_KEY: json.dumps(record, sort_keys=True)})
    if local != out:
        with open(local, "rb") as f:
            storage.write_bytes(out, f.read())
    return {"format": fmt, "layers": len(tensors) // 3, "out": out}


def _local_out(out: str) -> str:
    if storage.is_uri(out):
        return os.path.join(tempfile.mkdtemp(), "lora.safetensors")
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    return out
