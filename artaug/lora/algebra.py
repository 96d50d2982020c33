"""LoRA algebra across rounds: read a file as per-layer factors with its scale folded in, combine
files into one adapter (the rounds' combination among them).

Fusing adds scale * B @ A to a layer's weight, so fusing files one after another equals adding their
deltas: one adapter whose A is the inputs' A factors stacked (rows) and whose B is their scaled B
factors side by side (columns) has exactly that delta. Its rank is the sum of the inputs' ranks; an
SVD can re-compress it to a target rank, dropping the smallest singular values (error reported).

Written adapters carry every scale in B and have alpha == rank, one rank for every layer (layers of
lower rank are padded with zero rows and columns, which changes nothing), so every loader that applies
alpha / rank reads them the same way.
"""

from __future__ import annotations

import json
import math
import re

import torch
from diffusers import FluxPipeline
from diffusers.loaders.lora_base import LORA_ADAPTER_METADATA_KEY
from peft import LoraConfig
from peft.utils.other import get_pattern_key
from safetensors import safe_open

from artaug.lora.files import LoraFileError, check_finite, local_copy, read_metadata, save_lora

COMPONENTS = ("transformer.", "text_encoder.")  # key prefixes of the layers a FLUX LoRA may adapt


def read_factors(path: str) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """{layer: (A, B * scale)} in float64 of a transformer-only LoRA file in any layout diffusers reads.

    `scale` is the file's alpha / rank for that layer (from the adapter metadata; 1 without it, the
    diffusers convention), so B @ A is exactly what fusing the file at scale 1 adds to the layer.
    """
    factors = read_component_factors(path)
    others = sorted(set(factors) - {"transformer"})
    if others:
        raise LoraFileError(f"LoRA file {path}: only transformer lora_A/lora_B weights are supported "
                            f"(it has {', '.join(others)} keys)")  # fmt: skip
    return factors.get("transformer", {})


def read_component_factors(path: str) -> dict[str, dict[str, tuple[torch.Tensor, torch.Tensor]]]:
    """{component: {layer: (A, B * scale)}} for the transformer and text encoder keys of a LoRA file."""
    local = local_copy(path)
    check_finite(local)  # NaN or inf would spread into every layer's combined factors
    try:
        state, alphas, config = FluxPipeline.lora_state_dict(
            local, return_alphas=True, return_lora_metadata=True
        )
    except Exception as err:  # noqa: BLE001 - any reader failure means the file is not a LoRA we can read
        raise LoraFileError(f"LoRA file {path}: unreadable ({type(err).__name__}: {err})") from None
    foreign = [
        k for k in state if not k.startswith(COMPONENTS) or not k.endswith(("lora_A.weight", "lora_B.weight"))
    ]
    if foreign or alphas:
        what = ", ".join(foreign[:4]) or "per-layer network alphas"
        raise LoraFileError(
            f"LoRA file {path}: only lora_A/lora_B weights of the transformer and the text encoder are"
            f" supported ({what})"
        )
    factors: dict[str, dict] = {}
    for key in state:
        if not key.endswith("lora_A.weight"):
            continue
        component, _, name = key.partition(".")
        layer = name.removesuffix(".lora_A.weight")
        down, up = state[key].double(), state[key.replace("lora_A.weight", "lora_B.weight")].double()
        scale = _scale(config, component, layer, down.shape[0])
        factors.setdefault(component, {})[layer] = (down, up * scale)
    return factors


def _scale(config: dict | None, component: str, layer: str, rank: int) -> float:
    """alpha / rank (or alpha / sqrt(rank) with rslora) of one layer; 1 without metadata, as diffusers."""
    prefix = component + "."
    config = {k.removeprefix(prefix): v for k, v in (config or {}).items() if k.startswith(prefix)}
    if not config:
        return 1.0
    ranks, alphas = config.get("rank_pattern") or {}, config.get("alpha_pattern") or {}
    rank = ranks.get(get_pattern_key(ranks.keys(), layer), config["r"])
    alpha = alphas.get(get_pattern_key(alphas.keys(), layer), config["lora_alpha"])
    return alpha / (math.sqrt(rank) if config.get("use_rslora") else rank)


def delta(factors: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """The weight change B @ A of one layer."""
    down, up = factors
    return up @ down


def concatenate(
    inputs: list[dict[str, tuple[torch.Tensor, torch.Tensor]]], scales: list[float]
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """One adapter whose delta per layer is sum_i scales[i] * delta_i (layers missing in a file add 0)."""
    layers = sorted({layer for factors in inputs for layer in factors})
    out = {}
    for layer in layers:
        parts = [(f[layer], s) for f, s in zip(inputs, scales, strict=True) if layer in f]
        out[layer] = (torch.cat([a for (a, _), _ in parts]), torch.cat([b * s for (_, b), s in parts], dim=1))
    return out


def compress(factors: tuple[torch.Tensor, torch.Tensor], rank: int):
    """(A', B', dropped norm, total norm): the best rank-`rank` approximation of B @ A (Eckart-Young).

    Works on the thin QR factors, so it costs O((in + out) k^2) for a rank-k input, not an SVD of the
    full out x in matrix.
    """
    down, up = factors
    q_up, r_up = torch.linalg.qr(up)
    q_down, r_down = torch.linalg.qr(down.T)
    u, s, vh = torch.linalg.svd(r_up @ r_down.T)
    keep = min(rank, s.numel())
    root = s[:keep].sqrt()
    new_up = q_up @ (u[:, :keep] * root)
    new_down = (root[:, None] * vh[:keep]) @ q_down.T
    return new_down, new_up, s[keep:].square().sum().sqrt().item(), s.square().sum().sqrt().item()


def write_adapter(
    path: str, factors: dict[str, tuple[torch.Tensor, torch.Tensor]], metadata: dict, dtype=torch.float32
) -> int:
    """Write factors (scales already in B) as a diffusers LoRA file at alpha == rank; returns the rank."""
    rank = max(down.shape[0] for down, _ in factors.values())
    weights = {}
    for layer, (down, up) in factors.items():
        pad = rank - down.shape[0]
        weights[f"{layer}.lora_A.weight"] = torch.cat([down, down.new_zeros(pad, down.shape[1])]).to(dtype)
        weights[f"{layer}.lora_B.weight"] = torch.cat([up, up.new_zeros(up.shape[0], pad)], dim=1).to(dtype)
    # A regex matched in full: exactly these layers get LoRA layers on load (a plain name list would
    # also match every layer whose name merely ends with one of them).
    targets = "|".join(re.escape(layer) for layer in sorted(factors))
    save_lora(path, weights, LoraConfig(r=rank, lora_alpha=rank, target_modules=f"^(?:{targets})$"), metadata)
    return rank


def combine(
    paths: list[str],
    out: str,
    scales: list[float] | None = None,
    rank: int | None = None,
    metadata: dict | None = None,
) -> dict:
    """Combine LoRA files into one adapter at `out` equal to fusing them in order with `scales`.

    Exact (up to float32 storage) without `rank`; with `rank`, every layer is re-compressed to at most
    that rank by SVD and the summary reports the relative Frobenius error of the dropped part (overall
    and worst layer).
    """
    if not paths:
        raise LoraFileError("combine needs at least one LoRA file")
    scales = [1.0] * len(paths) if scales is None else [float(s) for s in scales]
    if len(scales) != len(paths):
        raise LoraFileError(f"combine: {len(scales)} scale(s) for {len(paths)} LoRA file(s)")
    if rank is not None and rank < 1:
        raise LoraFileError(f"combine: rank must be >= 1 (got {rank})")
    combined = concatenate([read_factors(p) for p in paths], scales)
    summary: dict = {"inputs": list(paths), "scales": scales, "layers": len(combined)}
    if rank is not None:
        dropped, total, worst = 0.0, 0.0, 0.0
        for layer, factors in combined.items():
            down, up, lost, norm = compress(factors, rank)
            combined[layer] = (down, up)
            dropped, total = dropped + lost**2, total + norm**2
            worst = max(worst, lost / norm if norm > 0 else 0.0)
        summary["relative_error"] = {
            "overall": math.sqrt(dropped / total) if total else 0.0,
            "worst_layer": worst,
        }
    inputs_meta = [read_metadata(p) for p in paths]
    bases = {m.get("base_model") for m in inputs_meta}
    record = {
        "combined_from": list(paths),
        "scales": scales,
        "input_rounds": [m.get("round") for m in inputs_meta],
        **({"base_model": bases.pop()} if len(bases) == 1 and None not in bases else {}),
        **({"relative_error": summary["relative_error"]} if rank is not None else {}),
        **(metadata or {}),
    }
    summary["rank"] = write_adapter(out, combined, record)
    summary["out"] = out
    return summary


def mean(paths: list[str], out: str, rank: int, exact_rank: int, metadata: dict | None = None,
         budget_bytes: int = 1 << 30) -> dict:  # fmt: skip
    """One adapter at `out` whose delta is the mean of the files' deltas (per-pair training's average).

    Exact (the factors concatenated, scale 1/N each) while the concatenation's rank stays within
    `exact_rank`; beyond it (1,000 pairs at rank 16 would be rank 16,000), each layer's mean is formed
    in fp32 and cut to `rank` by SVD, and the summary reports the relative Frobenius error of what was
    cut (overall and worst layer). Layers are averaged in groups of at most `budget_bytes` of fp32
    means, reading one file at a time and only the group's tensors of it, so the driver never holds
    the N adapters together.
    """
    if not paths:
        raise LoraFileError("mean needs at least one LoRA file")
    first = read_factors(paths[0])
    if max(down.shape[0] for down, _ in first.values()) * len(paths) <= exact_rank:
        return {**combine(paths, out, [1 / len(paths)] * len(paths), metadata=metadata), "exact": True}
    groups, group, size = [], [], 0
    for layer, (down, up) in sorted(first.items()):
        if group and size + 4 * up.shape[0] * down.shape[1] > budget_bytes:
            groups, group, size = [*groups, group], [], 0
        group, size = [*group, layer], size + 4 * up.shape[0] * down.shape[1]
    factors, dropped, total, worst = {}, 0.0, 0.0, 0.0
    for layers in [*groups, group]:
        sums = {layer: torch.zeros(first[layer][1].shape[0], first[layer][0].shape[1]) for layer in layers}
        for path in paths:
            for layer, (down, up) in _read_layers(path, layers).items():
                sums[layer] += (up @ down).float()
        for layer, summed in sums.items():
            average = summed / len(paths)
            if not torch.isfinite(average).all():
                raise LoraFileError(f"mean of {len(paths)} LoRA files: layer {layer} is not finite")
            down, up = _truncate(average, rank)
            lost, norm = (average - up @ down).norm().item(), average.norm().item()
            factors[layer] = (down.double(), up.double())
            dropped, total = dropped + lost**2, total + norm**2
            worst = max(worst, lost / norm if norm > 0 else 0.0)
    error = {"overall": math.sqrt(dropped / total) if total else 0.0, "worst_layer": worst}
    record = {"mean_of": len(paths), "relative_error": error, **(metadata or {})}
    return {"inputs": list(paths), "layers": len(factors), "relative_error": error, "exact": False,
            "rank": write_adapter(out, factors, record), "out": out}  # fmt: skip


def _read_layers(path: str, layers: list[str]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """{layer: (A, B * scale)} of only these transformer layers of a diffusers-layout file (as `save_lora`
    writes), read tensor by tensor: a group's pass over a FLUX.1-dev-sized file reads its share only."""
    with safe_open(local_copy(path), framework="pt") as f:
        config = json.loads((f.metadata() or {}).get(LORA_ADAPTER_METADATA_KEY) or "null")
        keys, out = set(f.keys()), {}
        for layer in layers:
            key = f"transformer.{layer}.lora_A.weight"
            if key in keys:
                down = f.get_tensor(key).double()
                up = f.get_tensor(key.replace("lora_A", "lora_B")).double()
                out[layer] = (down, up * _scale(config, "transformer", layer, down.shape[0]))
    return out


def _truncate(matrix: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(A, B) with B @ A the best rank-`rank` approximation of `matrix` (randomized beyond 2048 wide)."""
    if min(matrix.shape) <= 2048:
        u, s, vh = torch.linalg.svd(matrix, full_matrices=False)
    else:  # FLUX.1-dev's layers: a full SVD of each would take minutes on a driver's CPU
        u, s, v = torch.svd_lowrank(matrix, q=min(rank + 10, min(matrix.shape)), niter=4)
        vh = v.T
    keep = min(rank, s.numel())
    root = s[:keep].sqrt()
    return root[:, None] * vh[:keep], u[:, :keep] * root


def combine_rounds(loras: list[str], out: str, rank: int | None = None) -> dict:
    """The rounds' LoRAs as one adapter at `out`, equal to fusing them in round order."""
    return combine(loras, out, rank=rank, metadata={"rounds": len(loras)})
