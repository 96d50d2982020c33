"""train.mode dpo: the Diffusion-DPO loss on velocity errors checked by hand with a trained-looking LoRA,
one optimizer step moving the implicit rewards the right way, and `artaug train` end to end on the
shared latent cache (conftest's `differential`), its LoRA loaded back through diffusers."""

import json
import math
import os
import shutil

import numpy as np
import pytest
import torch
from peft import LoraConfig
from safetensors.torch import load_file

from artaug import storage
from artaug.cli import main as cli
from artaug.config import ModelConfig
from artaug.lora.files import WEIGHT_NAME, read_metadata
from artaug.models.flow_matching import pack, predict, sample_timesteps
from artaug.models.synthesis import load_pipeline
from artaug.models.tiny import build_tiny_flux
from artaug.train.preference import REWARDS, both_fell, dpo_loss, flow_dpo_loss
from artaug.train.worker import PROBE_FILE
from tests.test_train import TOLERANCE, probe_output


def seeded(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def tiny_pairs(count: int = 3) -> tuple[torch.Tensor, ...]:
    """(winner, loser, prompt embeds, pooled) for the tiny transformer: losers differ from winners."""
    winner = torch.randn(count, 16, 8, 8, generator=seeded(2))
    loser = winner + 0.5 * torch.randn(count, 16, 8, 8, generator=seeded(3))
    return (
        winner,
        loser,
        torch.randn(count, 12, 32, generator=seeded(4)),
        torch.randn(count, 32, generator=seeded(5)),
    )


def with_lora(transformer):
    torch.manual_seed(1)
    transformer.add_adapter(LoraConfig(r=2, lora_alpha=4, target_modules=["to_q", "to_v", "proj_mlp"]))
    return transformer


def test_dpo_loss_matches_the_formula_by_hand():
    """In float64: beta / 2 = 400 times a difference of two errors turns float32's rounding of the
    predictions (batched differently here) into differences of 1e-4 in the rewards."""
    beta, guidance = 800.0, 1.0
    transformer = with_lora(build_tiny_flux(0).transformer.requires_grad_(False).double())
    winner, loser, embeds, pooled = (x.double() for x in tiny_pairs())
    loss, reward_w, reward_l = flow_dpo_loss(
        transformer, winner, loser, embeds, pooled, seeded(9), guidance, beta
    )
    assert loss.item() == pytest.approx(math.log(2), abs=1e-7)  # B = 0: the model is its reference
    assert not reward_w.any() and not reward_l.any()

    with torch.no_grad():
        for name, weight in transformer.named_parameters():
            if "lora_B" in name:
                weight.copy_(0.2 * torch.randn(weight.shape, generator=seeded(len(name))))
    loss, reward_w, reward_l = flow_dpo_loss(
        transformer, winner, loser, embeds, pooled, seeded(9), guidance, beta
    )

    # By hand: one noise and one timestep per pair (drawn in that order), the same for both sides.
    generator = seeded(9)
    noise = torch.randn(pack(winner).shape, generator=generator).double()
    t = sample_timesteps(3, noise.shape[1], generator).double()
    base = build_tiny_flux(0).transformer.double()  # the reference: the same model without the LoRA
    errors = {}
    with torch.no_grad():
        for side, latents in (("w", winner), ("l", loser)):
            x0 = pack(latents)
            noisy = (1 - t[:, None, None]) * x0 + t[:, None, None] * noise
            inputs = (noisy, t, embeds, pooled, 8, 8, guidance)
            trained = predict(transformer, *inputs)
            transformer.disable_adapters()
            reference = predict(transformer, *inputs)
            transformer.enable_adapters()
            torch.testing.assert_close(reference, predict(base, *inputs), atol=1e-12, rtol=0)
            assert (trained - reference).abs().max() > 1e-3  # the LoRA does something
            errors[side] = [((p - (noise - x0)) ** 2).mean(dim=(1, 2)) for p in (trained, reference)]
    by_hand_w = -beta / 2 * (errors["w"][0] - errors["w"][1])
    by_hand_l = -beta / 2 * (errors["l"][0] - errors["l"][1])
    by_hand = -torch.log(torch.sigmoid(by_hand_w - by_hand_l)).mean()
    torch.testing.assert_close(reward_w, by_hand_w.float(), atol=1e-6, rtol=1e-6)  # returned in float32
    torch.testing.assert_close(reward_l, by_hand_l.float(), atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(loss, by_hand.float(), atol=1e-7, rtol=1e-6)
    assert (reward_w - reward_l).abs().min() > 0.01 and reward_w.abs().min() > 0.1  # far from the start
    # The pure function, on numbers: errors 0.5, 0.7 (model) against 0.6, 0.6 (reference), beta 10.
    one, r_w, r_l = dpo_loss(*(torch.tensor([x]) for x in (0.5, 0.7, 0.6, 0.6)), beta=10.0)
    assert (r_w.item(), r_l.item()) == pytest.approx((0.5, -0.5))
    assert one.item() == pytest.approx(math.log(1 + math.exp(-1.0)))


def test_one_step_raises_the_winners_reward_against_the_losers():
    transformer = with_lora(build_tiny_flux(0).transformer.requires_grad_(False))
    winner, loser, embeds, pooled = tiny_pairs()
    params = [p for p in transformer.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-3, weight_decay=0.0)

    def margin():
        loss, r_w, r_l = flow_dpo_loss(transformer, winner, loser, embeds, pooled, seeded(9), 1.0, 800.0)
        return loss, (r_w - r_l).mean()

    loss, before = margin()
    loss.backward()
    assert all(p.grad is not None for p in params)  # the reference pass left the LoRA trainable
    optimizer.step()
    with torch.no_grad():
        loss_after, after = margin()
    assert before.item() == 0 and after.item() > 0.01, after
    assert loss_after.item() < loss.item()


def test_a_warning_names_both_rewards_falling():
    steps = [{"step": i, REWARDS[0]: -0.1 * i, REWARDS[1]: -0.3 * i} for i in range(8)]
    assert "both implicit rewards fell" in both_fell(steps)
    assert both_fell([{**s, REWARDS[0]: 0.1 * s["step"]} for s in steps]) is None  # the winner's rose
    assert both_fell([{"step": 1, "loss": 1.0}, {"step": 2, "loss": 0.5}]) is None  # not a dpo run


SETS = {"train.mode": "dpo", "train.steps": 2, "train.num_workers": 1, "train.dpo_beta": 800.0}


@pytest.fixture(scope="module")
def dpo_run(differential, tmp_path_factory) -> str:
    """`artaug train` in dpo mode, 2 steps on one rank, on a copy of the shared latent cache."""
    out = str(tmp_path_factory.mktemp("dpo") / "out")
    shutil.copytree(os.path.join(differential["out"], "latents"), os.path.join(out, "latents"))
    args = ["train", "--pairs", differential["pairs"], "--out", out, "--preset", "tiny"]
    assert cli(args + [f"--set={k}={v}" for k, v in {**SETS, "train.checkpoint_every": 10}.items()]) == 0
    return out


def test_cli_trains_dpo_on_the_shared_cache_and_diffusers_loads_it(dpo_run):
    out = dpo_run
    lines = [json.loads(line) for line in open(f"{out}/lora/metrics.jsonl")]
    assert [(line["step"], line["phase"]) for line in lines] == [(1, "pairs"), (2, "pairs")]
    assert all(np.isfinite(line[key]) for line in lines for key in ("loss", *REWARDS))
    assert lines[0]["loss"] == pytest.approx(math.log(2)) and lines[0][REWARDS[0]] == 0  # step 1: B = 0
    assert lines[1][REWARDS[0]] != 0 and lines[1][REWARDS[1]] != 0
    summary = storage.read_summary(out)
    assert summary["mode"] == "dpo" and summary["steps"] == 2
    probe = load_file(os.path.join(summary["checkpoint"], PROBE_FILE))
    pipe = load_pipeline(ModelConfig())
    pipe.load_lora_weights(f"{out}/lora")
    np.testing.assert_allclose(probe_output(pipe.transformer, probe), probe["output"], atol=TOLERANCE)
    meta = read_metadata(f"{out}/lora/{WEIGHT_NAME}")
    assert meta["mode"] == "dpo" and meta["dpo_beta"] == 800.0 and meta["steps"] == 2


@pytest.mark.heavy
def test_a_killed_dpo_run_resumes_exactly(dpo_run, tmp_path):
    """The run above, its worker killed after step 1 (checkpointed): Ray Train resumes from step 1
    and ends with the same rewards, losses and LoRA bits."""
    from artaug.train.checkpoints import FaultInjection
    from tests.test_train import fit_tiny

    out = str(tmp_path / "out")
    fault = FaultInjection(rank=0, step=1, marker=str(tmp_path / "killed"))
    sets = {**SETS, "train.checkpoint_every": 1, "train.max_failures": 1}
    summary = fit_tiny(os.path.join(dpo_run, "latents"), out, [fault], **sets)
    assert os.path.exists(tmp_path / "killed") and summary["restarts"] == [{"from_step": 1}]
    lines, expected = ([json.loads(x) for x in open(f"{o}/lora/metrics.jsonl")] for o in (out, dpo_run))
    keys = ("step", "loss", *REWARDS)
    assert [[line[k] for k in keys] for line in lines] == [[line[k] for k in keys] for line in expected]
    weights, reference = load_file(f"{out}/lora/{WEIGHT_NAME}"), load_file(f"{dpo_run}/lora/{WEIGHT_NAME}")
    assert weights.keys() == reference.keys()
    for key, value in weights.items():
        torch.testing.assert_close(value, reference[key], atol=0, rtol=0)
