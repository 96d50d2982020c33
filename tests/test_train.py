"""Differential LoRA training: latent cache, Ray Train + DeepSpeed ZeRO-2 on 2 CPU workers (gloo),
checkpoints, recovery and resume, and the saved LoRA loaded back through diffusers.

One differential run through the CLI (conftest's `differential`) is shared by the training tests of
every mode; short runs on its latent cache check recovery and resume against an uninterrupted run.
"""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from artaug import storage
from artaug.cli import main as cli
from artaug.config import ModelConfig
from artaug.lora.files import WEIGHT_NAME, LoraFileError, read_metadata
from artaug.models.flow_matching import image_ids, pack, predict, sample_timesteps
from artaug.models.synthesis import load_pipeline
from artaug.train.checks import weights_digest
from artaug.train.data import sample_indices
from artaug.train.latents import skip_reason_kind
from artaug.train.worker import PHASE1_FILE, PROBE_FILE, FaultInjection
from tests.conftest import tiny_config
from tests.pairs import pair_row, write_pairs

TOLERANCE = 1e-5  # fp32 on CPU: the same weights through peft in a worker and through diffusers here


# ------------------------------------------------------------------ in process, no Ray


def test_packing_matches_diffusers():
    from diffusers import FluxPipeline

    latents = torch.randn(2, 16, 8, 6)
    assert torch.equal(pack(latents), FluxPipeline._pack_latents(latents, 2, 16, 8, 6))
    assert torch.equal(image_ids(8, 6), FluxPipeline._prepare_latent_image_ids(2, 4, 3, "cpu", torch.float32))


def test_timesteps_shift_toward_noise_for_larger_images():
    small = sample_timesteps(4000, 16, torch.Generator().manual_seed(0))
    large = sample_timesteps(4000, 4096, torch.Generator().manual_seed(0))
    assert 0 < small.min() and large.max() < 1
    assert large.mean() > small.mean() + 0.05  # FLUX's shift grows with the token count
    assert torch.equal(small, sample_timesteps(4000, 16, torch.Generator().manual_seed(0)))


def test_sample_order_is_a_function_of_seed_step_and_rank():
    t = tiny_config(**{"train.micro_batch_size": 2, "train.num_workers": 2}).train
    epoch = [i for step in (1, 2) for rank in (0, 1) for i in sample_indices(8, 0, 0, step, 0, rank, t)]
    assert sorted(epoch) == list(range(8))  # each epoch visits every pair once, split over ranks
    assert sample_indices(8, 0, 0, 3, 0, 1, t) == sample_indices(8, 0, 0, 3, 0, 1, t)
    assert sample_indices(8, 0, 0, 1, 0, 0, t) != sample_indices(8, 0, 1, 1, 0, 0, t)  # phases differ


def test_gradient_checkpointing_gives_the_same_gradients():
    """The GPU presets recompute activations; on the tiny model the LoRA gradients must not change."""
    from peft import LoraConfig

    from artaug.models.flow_matching import flow_matching_loss
    from artaug.models.tiny import build_tiny_flux

    grads = []
    for checkpointing in (False, True):
        transformer = build_tiny_flux(0).transformer.requires_grad_(False)
        torch.manual_seed(1)
        transformer.add_adapter(LoraConfig(r=2, lora_alpha=4, target_modules=["to_q", "proj_mlp"]))
        if checkpointing:
            transformer.enable_gradient_checkpointing()
            assert transformer.is_gradient_checkpointing
        loss = flow_matching_loss(
            transformer,
            torch.randn(2, 16, 8, 8, generator=torch.Generator().manual_seed(2)),
            torch.randn(2, 12, 32, generator=torch.Generator().manual_seed(3)),
            torch.randn(2, 32, generator=torch.Generator().manual_seed(4)),
            torch.Generator().manual_seed(5),
            guidance=1.0,
        )
        loss.backward()
        grads.append({n: p.grad.clone() for n, p in transformer.named_parameters() if p.requires_grad})
    assert grads[0].keys() == grads[1].keys() and grads[0]
    assert any(g.abs().sum() > 0 for g in grads[0].values())
    for name, grad in grads[0].items():
        torch.testing.assert_close(grads[1][name], grad, atol=1e-6, rtol=1e-5)


def test_lora_with_foreign_keys_fails_naming_them(tmp_path):
    from peft import LoraConfig

    from artaug.lora.files import save_lora
    from artaug.models.tiny import build_tiny_flux

    transformer = build_tiny_flux(0).transformer
    transformer.add_adapter(LoraConfig(r=2, lora_alpha=2, target_modules=["to_q"]))
    good = str(tmp_path / "good.safetensors")
    save_lora(good, _peft_weights(transformer), transformer.peft_config["default"], {})
    weights = load_file(good)
    weights["transformer.not_a_block.proj.lora_A.weight"] = torch.zeros(2, 32)
    weights["transformer.transformer_blocks.0.attn.to_q.lora_A.weight"] = torch.zeros(2, 7)  # wrong width
    bad = str(tmp_path / "bad.safetensors")
    save_file(weights, bad)
    with pytest.raises(LoraFileError) as err:
        load_pipeline(ModelConfig(loras=[bad]))
    message = str(err.value)
    assert "2 key(s) match no layer" in message
    assert "transformer.not_a_block.proj.lora_A.weight" in message
    assert "transformer.transformer_blocks.0.attn.to_q.lora_A.weight" in message
    load_pipeline(ModelConfig(loras=[good]))  # the untouched file loads


def _peft_weights(transformer, adapter="default") -> dict:
    from peft.utils import get_peft_model_state_dict

    return get_peft_model_state_dict(transformer, adapter_name=adapter)


def run_cli(*args) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "artaug.cli", *args], capture_output=True, text=True, timeout=180
    )


def test_no_trainable_pair_fails_before_any_worker_starts(tmp_path):
    pairs = write_pairs(
        str(tmp_path / "pairs"),
        [pair_row(0, error="enhance failed", after=None), pair_row(1, unchanged=True)],
    )
    result = run_cli("train", "--pairs", pairs, "--out", str(tmp_path / "out"))
    assert result.returncode == 2, result.stderr
    assert f"no pairs to train on in {pairs}: 2 rows (1 error rows, 1 unchanged)" in result.stderr
    assert "Traceback" not in result.stderr
    assert "Started a local Ray instance" not in result.stdout + result.stderr
    assert not os.path.exists(tmp_path / "out" / "latents")
    missing = run_cli("train", "--pairs", str(tmp_path / "nope"), "--out", str(tmp_path / "out"))
    assert missing.returncode == 2 and "does not exist" in missing.stderr


# ------------------------------------------------------------------ one differential run (CLI)


def test_cli_writes_the_run_and_refuses_to_overwrite(differential, capsys):
    out = differential["out"]
    assert differential["code"] == 0
    assert storage.is_complete(out) and storage.is_complete(f"{out}/latents")
    assert "mode: differential" in open(f"{out}/run.yaml").read()
    assert sorted(os.listdir(f"{out}/lora")) == ["metrics.jsonl", WEIGHT_NAME]
    assert cli(differential["args"]) == 2
    assert "already holds a completed stage (train)" in capsys.readouterr().err


def test_bad_pairs_are_skipped_and_counted(differential):
    cache = storage.read_summary(f"{differential['out']}/latents")
    assert cache["pairs"] == 14 and cache["usable"] == 8
    assert cache["skipped"] == {
        "error rows": 1,
        "missing after image": 1,
        "not accepted": 1,
        "size mismatch": 1,
        "unchanged": 1,
        "unreadable before image": 1,
    }
    assert skip_reason_kind("size mismatch (before 64x64, after 64x48, row 64x64)") == "size mismatch"


def test_loss_decreases_in_both_phases_and_every_step_is_recorded(differential):
    out, summary = differential["out"], differential["summary"]
    lines = [json.loads(line) for line in open(f"{out}/lora/metrics.jsonl")]
    assert [line["step"] for line in lines] == list(range(1, 17))
    assert [line["phase"] for line in lines] == ["before"] * 8 + ["after"] * 8
    assert all(line["seconds"] > 0 and np.isfinite(line["loss"]) for line in lines)
    state = json.load(open(os.path.join(summary["checkpoint"], "state.json")))
    evals = {(e["phase"], e["step"]): e["loss"] for e in state["evals"]}
    # Fixed noise and timesteps on the same pairs: each phase lowers its own loss clearly (LoRA-2
    # starts from a model already fitted to images much like its own, so it has less to gain).
    assert evals[("before", 8)] < 0.9 * evals[("before", 0)], evals
    assert evals[("after", 16)] < 0.95 * evals[("after", 8)], evals


def test_both_ranks_hold_the_saved_lora(differential):
    summary = differential["summary"]
    digests = summary["rank_digests"]
    assert len(digests) == 2 and digests[0] == digests[1]
    saved = load_file(f"{differential['out']}/lora/{WEIGHT_NAME}")
    assert weights_digest({k.removeprefix("transformer."): v for k, v in saved.items()}) == digests[0]


def probe_output(transformer, probe: dict) -> torch.Tensor:
    h, w = probe["size"].tolist()
    guidance = probe["guidance"].item()
    with torch.no_grad():
        return predict(
            transformer,
            probe["noisy"],
            probe["t"],
            probe["prompt_embeds"],
            probe["pooled_embeds"],
            h,
            w,
            None if guidance < 0 else guidance,
        )


def test_lora2_is_trained_on_the_merged_model_and_lora1_is_not_in_the_output(differential):
    out, final = differential["out"], differential["summary"]["checkpoint"]
    lora2, lora1 = f"{out}/lora/{WEIGHT_NAME}", os.path.join(final, PHASE1_FILE)
    probe = load_file(os.path.join(final, PROBE_FILE))
    # The trained model in the worker was base + LoRA-1 (merged) + LoRA-2: loading both reproduces it.
    merged = load_pipeline(ModelConfig(loras=[lora1]))
    merged.load_lora_weights(lora2)
    np.testing.assert_allclose(probe_output(merged.transformer, probe), probe["output"], atol=TOLERANCE)
    # The output file alone is LoRA-2 on the base model: LoRA-1's effect is not in it.
    base = load_pipeline(ModelConfig())
    base.load_lora_weights(lora2)
    assert (probe_output(base.transformer, probe) - probe["output"]).abs().max() > 100 * TOLERANCE
    with safe_open(lora2, framework="pt") as f:
        keys = set(f.keys())
    assert keys and all(k.startswith("transformer.") and (".lora_A." in k or ".lora_B." in k) for k in keys)
    assert not any(torch.equal(load_file(lora1)[k], load_file(lora2)[k]) for k in keys if "lora_A" in k)
    meta = read_metadata(lora2)
    assert meta["lora"] == "LoRA-2 (kept)" and meta["mode"] == "differential" and meta["round"] == 1
    assert (
        meta["base_model"] == "tiny(seed=0)" and meta["config_hash"] == differential["summary"]["config_hash"]
    )


def test_alpha_different_from_rank_survives_saving(differential, tmp_path):
    out, final = differential["out"], differential["summary"]["checkpoint"]
    lora2 = f"{out}/lora/{WEIGHT_NAME}"
    meta = read_metadata(lora2)
    assert (meta["rank"], meta["alpha"]) == (4, 8.0)
    with safe_open(lora2, framework="pt") as f:
        adapter = json.loads(f.metadata()["lora_adapter_metadata"])
    assert adapter["transformer.lora_alpha"] == 8 and adapter["transformer.r"] == 4
    # Without the adapter metadata diffusers would assume alpha == rank and halve the update: the
    # probe below then no longer matches, so the match in the test above depends on alpha surviving.
    stripped = str(tmp_path / "no-metadata.safetensors")
    save_file(load_file(lora2), stripped)
    probe = load_file(os.path.join(final, PROBE_FILE))
    pipe = load_pipeline(ModelConfig(loras=[os.path.join(final, PHASE1_FILE)]))
    pipe.load_lora_weights(stripped)
    assert (probe_output(pipe.transformer, probe) - probe["output"]).abs().max() > 100 * TOLERANCE


# ------------------------------------------------------------------ recovery and resume


def fit_tiny(cache_dir: str, out: str, faults=(), **overrides) -> dict:
    from artaug.train.trainer import fit

    return fit(tiny_config(**overrides), cache_dir, out, faults=faults)


@pytest.mark.heavy
def test_killed_worker_recovers_and_a_stopped_run_resumes_exactly(differential, tmp_path):
    """The reference run's configuration, interrupted twice, must end exactly where the reference did.

    1. Rank 1 is killed after step 6 (phase 1): Ray Train replaces the group and it resumes from the
       step-4 checkpoint (FailureConfig allows one failure).
    2. Rank 0 is killed after step 13 (phase 2): no failure is left, so the run stops.
    3. The same run is submitted again (same name and storage path): it resumes from the step-12
       checkpoint, merging LoRA-1 back from it.
    """
    import ray.train

    cache, out = f"{differential['out']}/latents", str(tmp_path / "out")
    faults = [
        FaultInjection(rank=1, step=6, marker=str(tmp_path / "killed-1")),
        FaultInjection(rank=0, step=13, marker=str(tmp_path / "killed-2")),
    ]
    with pytest.raises(ray.train.TrainingFailedError):
        fit_tiny(cache, out, faults, **{"train.max_failures": 1})
    assert open(tmp_path / "killed-1").read() == "killed rank 1 after step 6\n"
    assert open(tmp_path / "killed-2").read() == "killed rank 0 after step 13\n"
    assert not storage.exists(f"{out}/lora/{WEIGHT_NAME}")  # a failed fit leaves no LoRA behind
    summary = fit_tiny(cache, out)
    assert summary["restarts"] == [{"from_step": 4}, {"from_step": 12}]
    reference = differential["out"]
    lines = [json.loads(line) for line in open(f"{out}/lora/metrics.jsonl")]
    expected = [json.loads(line) for line in open(f"{reference}/lora/metrics.jsonl")]
    assert [line["step"] for line in lines] == list(range(1, 17))  # every step once, none repeated
    assert [line["loss"] for line in lines] == [line["loss"] for line in expected]
    weights, reference_weights = (
        load_file(f"{out}/lora/{WEIGHT_NAME}"),
        load_file(f"{reference}/lora/{WEIGHT_NAME}"),
    )
    assert weights.keys() == reference_weights.keys()
    for key, value in weights.items():
        torch.testing.assert_close(value, reference_weights[key], atol=0, rtol=0)
    # Checkpoints of one configuration are never resumed by another.
    from artaug.train.checkpoints import CheckpointConflictError

    with pytest.raises(CheckpointConflictError, match="another training configuration"):
        fit_tiny(cache, out, **{"train.learning_rate": 0.5})


def test_direct_mode_trains_after_images_only_and_diffusers_reproduces_it(differential, tmp_path):
    out = str(tmp_path / "out")
    summary = fit_tiny(
        f"{differential['out']}/latents",
        out,
        # one rank: the differential run above and the recovery test cover two
        **{"train.mode": "direct", "train.steps": 4, "train.checkpoint_every": 10, "train.num_workers": 1},
    )
    final = summary["checkpoint"]
    lines = [json.loads(line) for line in open(f"{out}/lora/metrics.jsonl")]
    assert [(line["step"], line["phase"]) for line in lines] == [(i, "after") for i in range(1, 5)]
    assert not os.path.exists(os.path.join(final, PHASE1_FILE))
    probe = load_file(os.path.join(final, PROBE_FILE))
    pipe = load_pipeline(ModelConfig())
    pipe.load_lora_weights(f"{out}/lora")  # the folder, by diffusers' default file name
    np.testing.assert_allclose(probe_output(pipe.transformer, probe), probe["output"], atol=TOLERANCE)
    assert read_metadata(f"{out}/lora/{WEIGHT_NAME}")["mode"] == "direct"


def test_pairwise_average_is_the_mean_of_the_subset_deltas(differential, tmp_path):
    """Two differential runs on disjoint halves of the pairs; the written adapter's weight change is the
    mean of theirs (computed here from the two subset files), and diffusers loads it like any LoRA."""
    from artaug.lora.algebra import read_factors
    from artaug.train.latents import read_cache

    cache, out = f"{differential['out']}/latents", str(tmp_path / "out")
    overrides = {
        "train.mode": "pairwise-average",
        "train.subsets": 2,
        "train.steps": 2,
        "train.before_steps": 2,
    }
    summary = fit_tiny(cache, out, **overrides, **{"train.num_workers": 1, "train.checkpoint_every": 10})
    ids = read_cache(cache).column("prompt_id").to_pylist()
    halves = [run["pairs"] for run in summary["subsets"]]
    assert halves == [ids[0::2], ids[1::2]] and not set(halves[0]) & set(halves[1])
    each = [read_factors(run["lora"]) for run in summary["subsets"]]
    mean = read_factors(f"{out}/lora/{WEIGHT_NAME}")
    assert mean.keys() == each[0].keys() == each[1].keys() and mean
    for layer, (down, up) in mean.items():
        deltas = [e[layer][1] @ e[layer][0] for e in each]
        torch.testing.assert_close(up @ down, (deltas[0] + deltas[1]) / 2, atol=1e-7, rtol=1e-5)
    assert any(
        (e0[1] @ e0[0] - e1[1] @ e1[0]).abs().max() > 1e-4
        for e0, e1 in zip(*[e.values() for e in each], strict=True)
    )
    lines = [json.loads(line) for line in open(f"{out}/lora/metrics.jsonl")]
    assert [(line["subset"], line["phase"]) for line in lines] == [
        (k, phase) for k in (0, 1) for phase in ("before", "before", "after", "after")
    ]
    meta = read_metadata(f"{out}/lora/{WEIGHT_NAME}")
    assert meta["mode"] == "pairwise-average" and meta["subsets"] == 2 and summary["rank"] == 8
    pipe = load_pipeline(ModelConfig())
    pipe.load_lora_weights(f"{out}/lora")
