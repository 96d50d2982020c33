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


def weights_of(pipe) -> dict[str, torch.Tensor]:
    """Every parameter and buffer of the pipeline's modules, by component."""
    return {
        f"{name}.{key}": value
        for name, component in pipe.components.items()
        if isinstance(component, torch.nn.Module)
        for key, value in component.state_dict().items()
    }


def assert_same_bits(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    differ = [k for k in a if a[k].dtype != b[k].dtype or not torch.equal(a[k], b[k])]
    assert not differ, differ[:5]


def test_a_warm_model_moved_between_rounds_has_the_bits_of_a_fresh_load(tiny_dir, tmp_path):
    """bf16: a host that moves through rounds 1-3 and the evaluation's base/enhanced swap holds, at
    every step, exactly the weights a fresh load of that model (what serve serves) holds."""
    from artaug.lora.algebra import combine_rounds
    from artaug.models.lineage import enhanced_model, model_of_round
    from artaug.models.synthesis import load_synthesis

    base = ModelConfig(source=tiny_dir, device="cpu", dtype="bfloat16")
    loras = [make_lora(tmp_path / f"round{k}", seed=k) for k in (1, 2, 3)]
    combined = combine_rounds(loras, str(tmp_path / "combined.safetensors"))["out"]
    pipe, weights = load_synthesis(base)
    assert pipe.transformer.dtype == torch.bfloat16
    pristine = {k: v.clone() for k, v in weights_of(pipe).items()}
    steps = [model_of_round(base, loras[:k]) for k in (1, 2, 3)]
    steps += [base, enhanced_model(base, combined), base, enhanced_model(base, combined)]
    for model in steps:
        weights.set(model.loras, model.lora_scale)
        assert_same_bits(weights_of(pipe), weights_of(load_pipeline(model)))
    assert_same_bits(weights_of(pipe), weights_of(load_pipeline(enhanced_model(base, combined))))
    weights.set([])
    assert_same_bits(weights_of(pipe), pristine)


def test_unfusing_in_bf16_does_not_restore_the_weights(tiny_dir, tmp_path):
    """Why warm hosts set weights from the pristine copy: diffusers' fuse then unfuse in bf16 leaves
    the weights off by rounding."""
    pipe = load_pipeline(ModelConfig(source=tiny_dir, device="cpu", dtype="bfloat16"))
    before = {k: v.clone() for k, v in pipe.transformer.state_dict().items()}
    pipe.load_lora_weights(make_lora(tmp_path / "r", seed=1), adapter_name="r")
    pipe.fuse_lora(adapter_names=["r"])
    pipe.unfuse_lora()
    pipe.unload_lora_weights()
    after = pipe.transformer.state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before)
