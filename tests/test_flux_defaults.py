"""The flux-dev preset's paper and authors' settings: training prompts drawn per round, regional masks
as the authors' code builds them, global suggestions in the enhancement's prompt, LoRA targets on
attention, feed-forward and modulation layers, an alignment scorer in the evaluation."""

import copy
import json

import pytest
import torch
import torch.nn.functional as F
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict
from torchvision.transforms import GaussianBlur

from artaug.config import load_config
from artaug.loop.prompt_sets import eval_prompts, train_prompts
from artaug.lora.files import save_lora
from artaug.lora.fuse import fuse_into_transformer, lora_layers
from artaug.models.interaction import global_prompt
from artaug.models.sampling import region_mask
from artaug.models.tiny import build_tiny_flux
from artaug.stages.enhance import Enhancer
from tests.conftest import tiny_config


@pytest.fixture(scope="module")
def flux_dev():
    return load_config("flux-dev")


# ------------------------------------------------------------------ training prompts


def test_flux_dev_trains_on_new_prompts_of_the_500_prompt_set_each_round(flux_dev):
    rounds = [train_prompts(flux_dev, k) for k in range(1, flux_dev.loop.rounds + 1)]
    texts = [{r["prompt"] for r in p.rows} for p in rounds]
    assert all(len(t) == flux_dev.loop.max_prompts > 16 for t in texts)  # not the 16 demo prompts
    assert not (texts[0] & texts[1]) and not (texts[1] & texts[2])
    assert rounds[0].source.endswith("train_prompts.txt")
    held_out = {r["prompt"] for r in eval_prompts(flux_dev).rows}
    assert not (set().union(*texts) & held_out)


def test_new_prompts_each_round_walks_the_file_and_wraps(tmp_path):
    path = tmp_path / "p.txt"
    path.write_text("".join(f"prompt {i}\n" for i in range(5)))
    fresh = tiny_config(prompts=str(path), **{"loop.max_prompts": 2, "loop.new_prompts_each_round": True})
    seen = [[r["prompt"] for r in train_prompts(fresh, k).rows] for k in (1, 2, 3)]
    assert seen == [["prompt 0", "prompt 1"], ["prompt 2", "prompt 3"], ["prompt 4", "prompt 0"]]
    same = tiny_config(prompts=str(path), **{"loop.max_prompts": 2})  # the default: the same each round
    assert [r["prompt"] for r in train_prompts(same, 3).rows] == ["prompt 0", "prompt 1"]


# ------------------------------------------------------------------ regional masks


def test_binary_coverage_snaps_box_edges_to_tokens():
    # 64 x 16 pixels: one row of 4 tokens.
    fraction = region_mask((0.0, 0.0, 0.375, 1.0), 64, 16, blur_kernel=1)
    assert fraction.tolist() == [1.0, 0.5, 0.0, 0.0]
    assert region_mask((0.0, 0.0, 0.375, 1.0), 64, 16, blur_kernel=1, coverage="binary").tolist() == [
        1,
        1,
        0,
        0,
    ]
    assert region_mask((0.0, 0.0, 0.3, 1.0), 64, 16, blur_kernel=1, coverage="binary").tolist() == [
        1,
        0,
        0,
        0,
    ]
    # A box thinner than half a token keeps the token holding its centre.
    assert region_mask((0.55, 0.0, 0.6, 1.0), 64, 16, blur_kernel=1, coverage="binary").tolist() == [
        0,
        0,
        1,
        0,
    ]


def test_flux_dev_masks_match_the_authors_blur_on_the_latent_grid(flux_dev):
    """DiffSynth-Studio's merge_latents: a binary mask on the 1/8 latent grid, GaussianBlur(33, 10)
    (torchvision); our flux-dev mask on the 1/16 token grid must be that mask averaged per token."""
    e = flux_dev.enhance
    assert (e.mask_scale, e.mask_coverage, e.blur_kernel, e.blur_sigma) == (100.0, "binary", 17, 5.0)
    side, box = 1024, (0.25, 0.3125, 0.625, 0.75)  # edges on token boundaries, away from the border
    cells = side // 8
    theirs = torch.zeros(1, 1, cells, cells)
    theirs[..., int(box[1] * cells) : int(box[3] * cells), int(box[0] * cells) : int(box[2] * cells)] = 1
    theirs = F.avg_pool2d(GaussianBlur(kernel_size=33, sigma=10.0)(theirs), 2).flatten()
    ours = region_mask(box, side, side, e.blur_kernel, e.blur_sigma, e.mask_coverage)
    assert (ours - theirs).abs().max() < 0.02
    narrow = region_mask(box, side, side, 5, 1.5)  # the former flux-dev blur: a much harder edge
    assert (narrow - theirs).abs().max() > 0.1


# ------------------------------------------------------------------ global suggestions

CRITIQUE = {
    "assessment": "flat and dark",
    "rating": 4,
    "adjustments": [
        {"aspect": "exposure", "direction": "increase", "strength": 2, "note": "brighter, golden light"},
        {"aspect": "camera_angle", "direction": "change", "strength": 3, "note": ""},
    ],
    "regions": [],
    "rewritten_prompt": "a lighthouse at dusk, golden light, low angle",
}


def test_global_prompt_choices():
    prompt = "a lighthouse on a rocky coast."
    assert global_prompt(prompt, CRITIQUE, "original") == prompt
    assert global_prompt(prompt, CRITIQUE, "rewritten") == CRITIQUE["rewritten_prompt"]
    assert global_prompt(prompt, {**CRITIQUE, "rewritten_prompt": "  "}, "rewritten") == prompt
    folded = global_prompt(prompt, CRITIQUE, "folded")
    assert folded == "a lighthouse on a rocky coast, brighter, golden light, change camera angle"
    assert global_prompt(prompt, {**CRITIQUE, "adjustments": []}, "folded") == prompt


@pytest.mark.parametrize("choice", ["original", "rewritten", "folded"])
def test_the_regional_job_gets_the_chosen_global_prompt(choice):
    """A critique with global adjustments and no regions: only "original" leaves the image unchanged."""
    cfg = tiny_config(**{"enhance.global_prompt": choice})
    row = {"prompt_id": "p0", "seed": 3, "round": 1, "prompt": "a lighthouse by the sea",
           "image": b"x", "width": 64, "height": 64, "steps": 2, "guidance": 3.5, "error": None,
           "critique": json.dumps(CRITIQUE)}  # fmt: skip
    pair = Enhancer(cfg)._plan(row)
    expected = global_prompt(row["prompt"], CRITIQUE, choice)
    assert pair["enhance_prompt"] == expected
    assert pair.get("_work", False) == (choice != "original") and pair["unchanged"] == (choice == "original")


def test_tiny_default_keeps_the_original_prompt():
    assert tiny_config().enhance.global_prompt == "original"


# ------------------------------------------------------------------ LoRA targets and evaluation


def test_flux_dev_targets_attention_feed_forward_and_modulation_layers(flux_dev, tmp_path):
    transformer = build_tiny_flux(seed=0).transformer
    fresh = copy.deepcopy(transformer)
    config = LoraConfig(r=2, lora_alpha=2, target_modules=list(flux_dev.train.target_modules))
    transformer.add_adapter(config, adapter_name="a")
    adapted = {n.rsplit(".lora_", 1)[0] for n, _ in transformer.named_parameters() if "lora_A" in n}
    for block in ("transformer_blocks.0", "single_transformer_blocks.0"):
        names = {n.removeprefix(block + ".") for n in adapted if n.startswith(block + ".")}
        expected = (
            {"attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0", "attn.add_q_proj", "attn.add_k_proj",
             "attn.add_v_proj", "attn.to_add_out", "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj",
             "ff_context.net.2", "norm1.linear", "norm1_context.linear"}
            if block == "transformer_blocks.0"
            else {"attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp", "proj_out", "norm.linear"}
        )  # fmt: skip
        assert {n.split(".lora_")[0] for n in names} == expected, block
    assert not any(
        n.startswith(("x_embedder", "context_embedder", "time_text_embed", "norm_out")) for n in adapted
    )
    # The LoRA file format and fusion carry every one of these layers.
    torch.manual_seed(0)
    for name, param in transformer.named_parameters():
        if "lora_B" in name:
            param.data.normal_(0, 0.05)
    path = str(tmp_path / "lora.safetensors")
    save_lora(path, get_peft_model_state_dict(transformer, adapter_name="a"), config, {"test": True})
    fuse_into_transformer(fresh, path)
    assert lora_layers(fresh) == []
    c = transformer.config
    inputs = dict(
        hidden_states=torch.randn(1, 16, c.in_channels),
        encoder_hidden_states=torch.randn(1, 8, c.joint_attention_dim),
        pooled_projections=torch.randn(1, c.pooled_projection_dim),
        timestep=torch.tensor([0.5]),
        img_ids=torch.zeros(16, 3),
        txt_ids=torch.zeros(8, 3),
        guidance=torch.tensor([3.5]) if c.guidance_embeds else None,
        return_dict=False,
    )
    with torch.no_grad():
        torch.testing.assert_close(fresh(**inputs)[0], transformer(**inputs)[0], atol=1e-4, rtol=1e-4)


def test_flux_dev_evaluation_measures_alignment(flux_dev):
    assert "clip_score" in flux_dev.evaluate.scorers
    assert "siglip_aesthetic" in flux_dev.evaluate.scorers  # an aesthetic the filter did not select on
