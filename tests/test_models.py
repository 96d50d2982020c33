"""The tiny FLUX builder and the synthesis loader (in process, no Ray)."""

import io

import numpy as np
import pytest
import torch
from PIL import Image

from artaug.config import ModelConfig
from artaug.models.synthesis import ModelSourceError, check_source, load_pipeline
from artaug.models.tiny import build_tiny_flux


def render(pipe, prompt="a red circle", seed=3) -> np.ndarray:
    return pipe(
        prompt=prompt,
        width=64,
        height=64,
        num_inference_steps=3,
        generator=torch.Generator().manual_seed(seed),
        max_sequence_length=64,
        output_type="np",
    ).images[0]


def test_tiny_weights_are_a_function_of_the_seed():
    a, b, c = (build_tiny_flux(s).transformer.state_dict() for s in (0, 0, 1))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)


def test_saved_and_reloaded_tiny_gives_identical_output(tiny_dir):
    reloaded = load_pipeline(ModelConfig(source=tiny_dir, device="cpu"))
    built = load_pipeline(ModelConfig(source="tiny", device="cpu"))
    assert np.array_equal(render(reloaded), render(built))
    assert not np.array_equal(render(built, seed=3), render(built, seed=4))


def make_lora(path, seed: int, rank: int = 4) -> str:
    """A random (non-zero) LoRA on the tiny transformer, saved in diffusers' layout."""
    from diffusers import FluxPipeline
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    transformer = build_tiny_flux(0).transformer
    transformer.add_adapter(
        LoraConfig(r=rank, lora_alpha=rank, target_modules=["to_q", "to_k", "to_v", "proj_out"])
    )
    generator = torch.Generator().manual_seed(seed)
    for name, param in transformer.named_parameters():
        if "lora_" in name:
            param.data = torch.randn(param.shape, generator=generator) * 0.3
    FluxPipeline.save_lora_weights(
        str(path), transformer_lora_layers=get_peft_model_state_dict(transformer), safe_serialization=True
    )
    return str(path / "pytorch_lora_weights.safetensors")


def fuse_by_hand(pipe, lora_file: str, scale: float = 1.0) -> None:
    """W += scale * B @ A for every layer the file names (alpha == rank, so no extra factor)."""
    from safetensors.torch import load_file

    weights = load_file(lora_file)
    modules = dict(pipe.transformer.named_modules())
    for key in weights:
        if ".lora_A." not in key:
            continue
        module = modules[key.removeprefix("transformer.").split(".lora_A.")[0]]
        down, up = weights[key], weights[key.replace(".lora_A.", ".lora_B.")]
        module.weight.data += scale * up @ down


def test_loras_fused_on_load_match_fusing_by_hand(tiny_dir, tmp_path):
    first = make_lora(tmp_path / "round1", seed=1)
    second = make_lora(tmp_path / "round2", seed=2)
    base = render(load_pipeline(ModelConfig(source=tiny_dir, device="cpu")))
    loaded = load_pipeline(ModelConfig(source=tiny_dir, device="cpu", loras=[first, second], lora_scale=0.5))
    by_hand = load_pipeline(ModelConfig(source=tiny_dir, device="cpu"))
    fuse_by_hand(by_hand, first, 0.5)
    fuse_by_hand(by_hand, second, 0.5)
    # No LoRA layers are left: inference costs what the base model costs.
    assert not [n for n, _ in loaded.transformer.named_parameters() if "lora" in n]
    fused, manual = render(loaded), render(by_hand)
    assert np.abs(fused - base).max() > 1e-2  # the LoRAs change the output
    np.testing.assert_allclose(fused, manual, atol=1e-5)


def test_missing_model_folder_is_named(tmp_path):
    with pytest.raises(ModelSourceError, match=str(tmp_path / "nope")):
        check_source(ModelConfig(source=str(tmp_path / "nope")))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelSourceError, match="no model_index.json"):
        check_source(ModelConfig(source=str(tmp_path / "empty")))
    with pytest.raises(ModelSourceError, match="missing.safetensors"):
        check_source(ModelConfig(loras=[str(tmp_path / "missing.safetensors")]))
    check_source(ModelConfig(source="black-forest-labs/FLUX.1-dev"))  # a hub id is not a path


def decode(png: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(png)).convert("RGB"), dtype=np.int16)
