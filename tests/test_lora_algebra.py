"""LoRA algebra across rounds (combine, SVD re-compression, fuse to plain weights) and the kohya /
ComfyUI key layouts, on small random LoRAs of the tiny transformer (in process, no Ray)."""

import math

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from artaug.cli import main as cli
from artaug.config import ModelConfig
from artaug.lora.algebra import combine, read_factors
from artaug.lora.export import export
from artaug.lora.files import read_metadata, save_lora
from artaug.lora.fuse import fuse_into_transformer, lora_layers
from artaug.models.synthesis import load_pipeline
from artaug.models.tiny import build_tiny_flux
from tests.test_models import render

TOLERANCE = 1e-5
DOUBLE = ["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out"]


def random_lora(path, seed: int, rank: int, alpha: float, targets: list[str]) -> str:
    """A LoRA file as training writes it (peft config with alpha != rank), with random non-zero factors."""
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    transformer = build_tiny_flux(0).transformer
    config = LoraConfig(r=rank, lora_alpha=alpha, target_modules=targets)
    transformer.add_adapter(config)
    generator = torch.Generator().manual_seed(seed)
    for name, param in transformer.named_parameters():
        if "lora_" in name:
            param.data = torch.randn(param.shape, generator=generator) * 0.2
    save_lora(
        str(path), get_peft_model_state_dict(transformer), config, {"round": seed, "base_model": "tiny"}
    )
    return str(path)


def fused_weights(files: list[str], scales: list[float] | None = None) -> dict[str, torch.Tensor]:
    """The tiny transformer's weights after fusing `files` one after another with our production path."""
    transformer = build_tiny_flux(0).transformer
    for path, scale in zip(files, scales or [1.0] * len(files), strict=True):
        fuse_into_transformer(transformer, path, scale)
    assert not lora_layers(transformer)
    return {k: v.clone() for k, v in transformer.state_dict().items()}


def max_difference(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max((a[k] - b[k]).abs().max().item() for k in a)


@pytest.fixture(scope="module")
def rounds(tmp_path_factory):
    """Three rounds of different ranks, alphas and partly different layers."""
    root = tmp_path_factory.mktemp("rounds")
    return [
        random_lora(root / "r1.safetensors", 1, rank=4, alpha=8.0, targets=["to_q", "to_k", "proj_out"]),
        random_lora(root / "r2.safetensors", 2, rank=2, alpha=1.0, targets=["to_q", "to_v", "proj_mlp"]),
        random_lora(root / "r3.safetensors", 3, rank=3, alpha=3.0, targets=["to_k", "norm_out.linear"]),
    ]


@pytest.mark.parametrize("count,scales", [(2, None), (3, [1.0, 0.5, -0.7])])
def test_combined_adapter_equals_sequential_fusion(rounds, tmp_path, count, scales):
    files = rounds[:count]
    out = str(tmp_path / "combined.safetensors")
    summary = combine(files, out, scales=scales)
    base = build_tiny_flux(0).transformer.state_dict()
    sequential = fused_weights(files, scales)
    assert max_difference(sequential, base) > 1e-2  # the rounds change the weights
    assert max_difference(fused_weights([out]), sequential) < TOLERANCE
    # One rank for every layer: the largest sum of overlapping input ranks (to_q 4+2, to_k 4+3).
    assert summary["rank"] == {2: 6, 3: 7}[count] and summary["inputs"] == files
    weights = load_file(out)
    assert {w.shape[0] for k, w in weights.items() if "lora_A" in k} == {summary["rank"]}
    assert read_metadata(out)["combined_from"] == files
    # diffusers' own pipeline loader applies it the same way (alpha == rank is in the adapter metadata).
    pipe = build_tiny_flux(0)
    pipe.load_lora_weights(out)
    pipe.fuse_lora()
    pipe.unload_lora_weights()
    assert max_difference(pipe.transformer.state_dict(), sequential) < TOLERANCE


def test_svd_compression_reports_its_error_and_is_exact_at_full_rank(rounds, tmp_path):
    exact = fused_weights(rounds)
    base = build_tiny_flux(0).transformer.state_dict()
    full = combine(rounds, str(tmp_path / "full.safetensors"), rank=7)
    assert full["relative_error"] == {"overall": 0.0, "worst_layer": 0.0}
    assert max_difference(fused_weights([str(tmp_path / "full.safetensors")]), exact) < TOLERANCE
    small = combine(rounds, str(tmp_path / "r2.safetensors"), rank=2)
    assert small["rank"] == 2
    approx = fused_weights([str(tmp_path / "r2.safetensors")])
    # The reported error is the measured one: ||W_approx - W_exact|| / ||W_exact - W_base||, all layers.
    dropped = sum((approx[k] - exact[k]).double().square().sum() for k in exact)
    total = sum((exact[k] - base[k]).double().square().sum() for k in exact)
    measured = math.sqrt(dropped / total)
    assert 0.01 < small["relative_error"]["overall"] <= small["relative_error"]["worst_layer"] < 1
    assert small["relative_error"]["overall"] == pytest.approx(measured, rel=1e-3)


def test_scales_and_inputs_are_checked(rounds, tmp_path, capsys):
    code = cli(["lora", "combine", *rounds[:2], "--scale", "1", "--out", str(tmp_path / "x.safetensors")])
    assert code == 2 and "1 scale(s) for 2 LoRA file(s)" in capsys.readouterr().err
    (tmp_path / "junk.safetensors").write_bytes(b"junk")
    assert cli(["lora", "combine", str(tmp_path / "junk.safetensors"), "--out", str(tmp_path / "y")]) == 2
    assert "unreadable" in capsys.readouterr().err


def test_cli_combine_and_fuse_give_a_plain_pipeline(rounds, tiny_dir, tmp_path, capsys):
    combined = str(tmp_path / "combined.safetensors")
    assert cli(["lora", "combine", *rounds[:2], "--out", combined, "--rank", "4"]) == 0
    assert "relative error" in capsys.readouterr().out
    out = str(tmp_path / "fused")
    assert cli(["fuse", "--base", tiny_dir, "--lora", rounds[0], "--lora", rounds[1], "--out", out]) == 0
    fused = load_pipeline(ModelConfig(source=out, device="cpu"))
    base = load_pipeline(ModelConfig(source=tiny_dir, device="cpu"))
    for name, component in fused.components.items():
        if isinstance(component, torch.nn.Module):  # no peft layer, the same parameter names as the base
            assert not lora_layers(component), name
            assert component.state_dict().keys() == base.components[name].state_dict().keys()
    on_load = load_pipeline(ModelConfig(source=tiny_dir, device="cpu", loras=rounds[:2]))
    np.testing.assert_allclose(render(fused), render(on_load), atol=TOLERANCE)
    assert np.abs(render(fused) - render(base)).max() > 1e-2


@pytest.fixture(scope="module")
def wide_lora(tmp_path_factory):
    """Layers of every kind the original layout names differently: fused q/k/v (+ MLP in), top-level."""
    targets = [*DOUBLE, "proj_mlp", "proj_out", "norm_out.linear", "x_embedder", "norm1.linear", "ff.net.2"]
    return random_lora(tmp_path_factory.mktemp("wide") / "lora.safetensors", 5, 3, 6.0, targets)


@pytest.mark.parametrize("fmt", ["kohya", "comfyui"])
def test_export_round_trip_keeps_keys_and_delta(wide_lora, tmp_path, fmt):
    other = str(tmp_path / f"{fmt}.safetensors")
    back = str(tmp_path / "back.safetensors")
    export(wide_lora, fmt, other)
    keys = load_file(other).keys()
    if fmt == "kohya":
        assert "lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight" in keys
        assert "lora_unet_single_blocks_0_linear1.lora_up.weight" in keys
        assert "lora_unet_final_layer_adaLN_modulation_1.alpha" in keys
    else:
        assert "diffusion_model.double_blocks.0.txt_attn.qkv.lora_down.weight" in keys
        assert "diffusion_model.img_in.lora_up.weight" in keys
    assert not any(k.startswith("transformer.") for k in keys)
    export(other, "diffusers", back)
    original, returned = read_factors(wide_lora), read_factors(back)
    assert returned.keys() == original.keys()
    for layer, (down, up) in original.items():
        torch.testing.assert_close(returned[layer][1] @ returned[layer][0], up @ down, atol=1e-6, rtol=0)
    assert max_difference(fused_weights([back]), fused_weights([wide_lora])) < TOLERANCE


def test_diffusers_reads_our_kohya_export(tmp_path):
    """A third-party reader: diffusers' own kohya converter (double-block layers; its single-block
    conversion assumes FLUX.1's full width) gives the same delta."""
    from diffusers import FluxPipeline

    lora = random_lora(
        tmp_path / "lora.safetensors", 7, 2, 4.0, [f"transformer_blocks.0.attn.{n}" for n in DOUBLE]
    )
    kohya = str(tmp_path / "kohya.safetensors")
    export(lora, "kohya", kohya)
    state = FluxPipeline.lora_state_dict(kohya)
    original = read_factors(lora)
    assert {k.removeprefix("transformer.").rsplit(".lora_", 1)[0] for k in state} == set(original)
    for layer, (down, up) in original.items():
        theirs = (
            state[f"transformer.{layer}.lora_B.weight"].double()
            @ state[f"transformer.{layer}.lora_A.weight"].double()
        )
        torch.testing.assert_close(theirs, up @ down, atol=1e-6, rtol=0)
