"""Our LoRA files read by a loader we did not write: DiffSynth-Studio's `FluxLoRALoader` (the `diffsynth`
package from PyPI, the ArtAug authors' own library), fusing into DiffSynth's own FLUX blocks.

`diffsynth` and the few packages its import needs are installed by scripts/install.sh into a folder
of their own (tests/lora_consumers.txt, `.venv/consumers`), so its pins never touch the main
environment; the loader runs in a subprocess that has that folder on its path.

The expected change of every DiffSynth weight is written here from DiffSynth's published module
names (`FluxDiT`: `blocks.N.attn.a_to_qkv`, `single_blocks.N.to_qkv_mlp`, ...), not from our export
code: q, k and v (and a single block's MLP input) are one fused weight there, in that row order.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from diffusers import FluxTransformer2DModel
from safetensors.torch import load_file

from artaug.lora.algebra import delta, read_factors
from artaug.lora.export import export
from artaug.lora.files import save_lora
from artaug.models.tiny import build_tiny_flux

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONSUMERS = os.environ.get("ARTAUG_CONSUMERS", os.path.join(ROOT, ".venv", "consumers"))
RANK, ALPHA = 3, 6.0  # alpha != rank: the training file's scale lives in its metadata
DOUBLE_BLOCKS = SINGLE_BLOCKS = 2  # block ids 0 and 1: the loaders parse them out of the key names
# Every family of the two block kinds (attention, feed-forward, modulation, the single block's MLP
# input and output), and top-level layers, which DiffSynth's FLUX loader has no names for.
TARGETS = [
    "to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out",
    "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2", "norm1.linear",
    "norm1_context.linear", "proj_mlp", "proj_out", "norm.linear", "x_embedder", "norm_out.linear",
]  # fmt: skip
TOP_LEVEL = {"proj_out", "x_embedder", "norm_out.linear"}
# DiffSynth's name for each diffusers layer of a block; fused weights list their parts in row order.
DOUBLE_NAMES = {
    "attn.a_to_qkv": ["attn.to_q", "attn.to_k", "attn.to_v"],
    "attn.b_to_qkv": ["attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"],
    "attn.a_to_out": ["attn.to_out.0"],
    "attn.b_to_out": ["attn.to_add_out"],
    "ff_a.0": ["ff.net.0.proj"],
    "ff_a.2": ["ff.net.2"],
    "ff_b.0": ["ff_context.net.0.proj"],
    "ff_b.2": ["ff_context.net.2"],
    "norm1_a.linear": ["norm1.linear"],
    "norm1_b.linear": ["norm1_context.linear"],
}
SINGLE_NAMES = {
    "to_qkv_mlp": ["attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp"],
    "proj_out": ["proj_out"],
    "norm.linear": ["norm.linear"],
}


@pytest.fixture(scope="module")
def training_file(tmp_path_factory) -> str:
    """A LoRA as training writes it (diffusers layout, alpha in the peft metadata), random factors."""
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    config = dict(build_tiny_flux(0).transformer.config)
    transformer = FluxTransformer2DModel.from_config(
        {**config, "num_layers": DOUBLE_BLOCKS, "num_single_layers": SINGLE_BLOCKS}
    )
    lora = LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=TARGETS)
    transformer.add_adapter(lora)
    generator = torch.Generator().manual_seed(11)
    for name, param in transformer.named_parameters():
        if "lora_" in name:
            param.data = torch.randn(param.shape, generator=generator) * 0.2
    path = str(tmp_path_factory.mktemp("consumer") / "lora.safetensors")
    save_lora(path, get_peft_model_state_dict(transformer), lora, {"round": 1, "base_model": "tiny"})
    return path


LAYOUTS = ("kohya", "diffusers", "comfyui", "training")  # our exports, and the training file as it is


@pytest.fixture(scope="module")
def diffsynth(training_file, tmp_path_factory) -> dict[str, dict[str, torch.Tensor]]:
    """{layout: {DiffSynth weight name: the change its loader made}}, from one process that imports
    `diffsynth` and fuses each file into fresh blocks."""
    assert os.path.isdir(os.path.join(CONSUMERS, "diffsynth")), (
        f"diffsynth is not installed in {CONSUMERS}: run scripts/install.sh (tests/lora_consumers.txt)"
    )
    folder = tmp_path_factory.mktemp("diffsynth")
    files = []
    for layout in LAYOUTS:
        files.append(training_file if layout == "training" else str(folder / f"{layout}.safetensors"))
        if layout != "training":
            export(training_file, layout, files[-1])
    config = build_tiny_flux(0).transformer.config
    dim = config.num_attention_heads * config.attention_head_dim
    command = [sys.executable, os.path.join(ROOT, "tests", "consumers", "diffsynth_fuse.py"), str(folder),
               *files, "--dim", str(dim), "--heads", str(config.num_attention_heads),
               "--double", str(DOUBLE_BLOCKS), "--single", str(SINGLE_BLOCKS)]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": CONSUMERS}
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    changed = json.loads(done.stdout.strip().splitlines()[-1])
    out = {}
    for index, layout in enumerate(LAYOUTS):
        out[layout] = load_file(str(folder / f"{index}.safetensors")) if changed[index] else {}
        assert sorted(out[layout]) == changed[index]
    return out


def expected_deltas(ours: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """What fusing our file adds to each DiffSynth weight that has a name for our layers."""
    expected = {}
    for kind, count, names in (("", DOUBLE_BLOCKS, DOUBLE_NAMES), ("single_", SINGLE_BLOCKS, SINGLE_NAMES)):
        for block in range(count):
            for theirs, parts in names.items():
                ours_prefix = f"{kind}transformer_blocks.{block}."
                expected[f"{kind}blocks.{block}.{theirs}.weight"] = torch.cat(
                    [delta(ours[ours_prefix + part]) for part in parts]
                )
    return expected


@pytest.mark.parametrize("layout", ["kohya", "diffusers"])
def test_diffsynth_fuses_our_export_exactly(training_file, diffsynth, layout):
    """Every block family lands on DiffSynth's fused weights with our delta; top-level layers, which
    its FLUX loader has no names for, change nothing there (the docs say so)."""
    ours = read_factors(training_file)
    assert {layer.rsplit(".", 1)[-1] for layer in ours} >= {"to_q", "proj_mlp", "linear"}
    assert any(layer in TOP_LEVEL for layer in ours)
    expected = expected_deltas(ours)
    theirs = diffsynth[layout]
    assert sorted(theirs) == sorted(expected), "DiffSynth changed other weights than the blocks' LoRA layers"
    for name, change in expected.items():
        torch.testing.assert_close(theirs[name], change, atol=1e-9, rtol=0, msg=name)


def test_what_diffsynth_does_with_our_other_files(training_file, diffsynth):
    """The training file keeps alpha in peft metadata, which DiffSynth does not read: it fuses rank /
    alpha of the change. The ComfyUI layout has no key DiffSynth's loader names: nothing changes.
    Both are why the docs say: hand DiffSynth a kohya or diffusers export."""
    for name, change in expected_deltas(read_factors(training_file)).items():
        torch.testing.assert_close(diffsynth["training"][name], change * RANK / ALPHA, atol=1e-9, rtol=0)
    assert diffsynth["comfyui"] == {}
