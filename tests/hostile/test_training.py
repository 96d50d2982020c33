"""Hostile cases of training and partial-stage resume: incomplete checkpoints, a diverging learning
rate, non-finite LoRA files, a changed learning rate on resume, a generate stage killed half-way.
Each asserts the one-line error (or the recovery) and that nothing was lost or written elsewhere."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import save_file

from artaug import storage
from artaug.cli import main as cli
from tests.conftest import tiny_config
from tests.pairs import pair_row, write_pairs

# ------------------------------------------------------------------ checkpoints (no Ray)


def fake_checkpoint(experiment, step: int, world: int = 1, final: bool = False) -> str:
    """A checkpoint folder as the workers write it: files, then each rank's marker."""
    from artaug.train.checkpoints import write_marker

    folder = os.path.join(experiment, f"step-{step:06d}" + ("-final" if final else ""))
    for rank in range(world):
        os.makedirs(os.path.join(folder, "deepspeed"), exist_ok=True)
        with open(os.path.join(folder, "deepspeed", f"rank{rank}_optim.pt"), "wb") as f:
            f.write(os.urandom(64))
        if rank == 0:
            with open(os.path.join(folder, "state.json"), "w") as f:
                json.dump({"step": step}, f)
        write_marker(folder, rank, world, step)  # markers of all ranks land in one folder, as in Ray
    return folder


def snapshot(experiment, *names: str) -> None:
    steps = [int(n.split("-")[1]) for n in names]
    results = [{"checkpoint_dir_name": n, "metrics": {"step": s}} for n, s in zip(names, steps, strict=True)]
    with open(os.path.join(experiment, "checkpoint_manager_snapshot.json"), "w") as f:
        json.dump({"checkpoint_results": results, "latest_checkpoint_result": results[-1]}, f)


def test_partial_checkpoint_falls_back_to_the_previous_complete_one(tmp_path, caplog):
    from artaug.train.checkpoints import prepare

    experiment = str(tmp_path / "artaug")
    older = fake_checkpoint(experiment, 4, world=2)
    cut = fake_checkpoint(experiment, 8, world=2)
    missing_rank = fake_checkpoint(experiment, 12, world=2)
    with open(os.path.join(cut, "deepspeed", "rank1_optim.pt"), "r+b") as f:
        f.truncate(10)  # an upload cut short
    os.remove(os.path.join(missing_rank, "complete-rank-1.json"))  # rank 1 never finished
    snapshot(experiment, "step-000004", "step-000008", "step-000012")
    with caplog.at_level("WARNING"):
        assert prepare(experiment) == older
    assert "rank1_optim.pt has 10 bytes, rank 1 wrote 64" in caplog.text
    assert "no complete-rank-1.json" in caplog.text and f"resuming from {older}" in caplog.text
    assert sorted(os.listdir(experiment)) == ["step-000004"]  # the older one kept, Ray's stale list gone
    assert os.path.getsize(os.path.join(older, "deepspeed", "rank0_optim.pt")) == 64


def test_no_complete_checkpoint_but_progress_is_refused_and_nothing_deleted(tmp_path):
    from artaug.train.checkpoints import CheckpointError, prepare

    experiment = str(tmp_path / "artaug")
    folder = fake_checkpoint(experiment, 8)
    os.remove(os.path.join(folder, "state.json"))
    snapshot(experiment, "step-000008")
    with pytest.raises(CheckpointError) as err:
        prepare(experiment)
    message = str(err.value)
    assert "\n" not in message and "reached step 8 but no checkpoint is complete" in message
    assert "state.json is missing" in message and "--overwrite" in message
    assert os.path.isdir(folder) and os.path.exists(
        os.path.join(experiment, "checkpoint_manager_snapshot.json")
    )
    # Ray's snapshot naming a folder that is gone entirely is the same claim of progress.
    os.rename(folder, str(tmp_path / "elsewhere"))
    with pytest.raises(CheckpointError, match="reached step 8"):
        prepare(experiment)
    assert prepare(str(tmp_path / "fresh")) is None  # nothing claimed: training starts from step 0


# ------------------------------------------------------------------ non-finite LoRA files


def nan_lora(path: str) -> str:
    weights = {
        "transformer.single_transformer_blocks.0.attn.to_q.lora_A.weight": torch.zeros(4, 32),
        "transformer.single_transformer_blocks.0.attn.to_q.lora_B.weight": torch.full((32, 4), float("nan")),
    }
    save_file(weights, path)
    return path


def test_combine_fuse_and_serve_refuse_a_lora_with_nan(tmp_path, capsys):
    from artaug.lora.files import LoraFileError
    from artaug.serve.launch import resolve_config

    bad = nan_lora(str(tmp_path / "bad.safetensors"))
    tensor = "transformer.single_transformer_blocks.0.attn.to_q.lora_B.weight"
    for args, out in (
        (["lora", "combine", bad, "--out", str(tmp_path / "c.safetensors")], tmp_path / "c.safetensors"),
        (["fuse", "--base", "tiny", "--lora", bad, "--out", str(tmp_path / "fused")], tmp_path / "fused"),
    ):
        assert cli(args) == 2
        err = capsys.readouterr().err.strip()
        assert bad in err and tensor in err and "NaN or inf" in err and len(err.splitlines()) == 1, err
        assert not out.exists()  # nothing written
    with pytest.raises(LoraFileError, match=f"{bad}: 1 tensor.s. hold NaN or inf.*{tensor}"):
        resolve_config(lora=bad)


# ------------------------------------------------------------------ a diverging learning rate (Ray Train)


@pytest.mark.heavy
def test_diverging_training_stops_at_the_step_and_saves_nothing(ray_local, tmp_path, capsys):
    """lr 1e6 on the tiny model: step 2's loss is huge, step 3's is NaN. The run stops there with one
    line, writes no LoRA and no marker; its complete checkpoints (steps 1, 2) stay for inspection."""
    from artaug.train.checkpoints import latest_complete, problem

    pairs = write_pairs(
        str(tmp_path / "pairs"), [pair_row(i, width=32, height=32, accepted=True) for i in range(4)]
    )
    out = str(tmp_path / "train")
    sets = {"train.num_workers": 1, "train.mode": "direct", "train.steps": 4, "train.checkpoint_every": 1,
            "train.learning_rate": "1.0e+6"}  # fmt: skip
    args = ["train", "--pairs", pairs, "--out", out, "--round", "3"]
    assert cli(args + [f"--set={k}={v}" for k, v in sets.items()]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "training diverged in round 3, phase 1 (after images), step 3: loss nan" in err, err
    assert "--set train.learning_rate=100000" in err
    assert not storage.is_complete(out) and not os.path.exists(os.path.join(out, "lora"))
    experiment = os.path.join(out, "checkpoints", "artaug")
    chosen, skipped = latest_complete(experiment)
    assert chosen.endswith("step-000002") and not skipped  # the workers' markers cover their files
    # DeepSpeed's files of step 2 cut short: a resume would take step 1, not train on from scratch.
    states = os.path.join(chosen, "deepspeed", "mp_rank_00_model_states.pt")
    with open(states, "r+b") as f:
        f.truncate(100)
    assert "mp_rank_00_model_states.pt has 100 bytes" in problem(chosen)
    assert latest_complete(experiment)[0].endswith("step-000001")


# ------------------------------------------------------------------ a new learning rate on resume (no Ray)


def test_resume_accepts_a_new_learning_rate_and_refuses_other_changes(tmp_path):
    from artaug.layout import RunLayout
    from artaug.loop.manifest import RunDirError
    from artaug.loop.rundir import reopen, start

    run_dir = str(tmp_path / "run")
    manifest = start(tiny_config(**{"loop.rounds": 2}), run_dir)
    manifest.set(status="failed")
    layout = RunLayout(run_dir)
    train = layout.round(1).train
    for folder in (train.latents, os.path.join(train.checkpoints, "artaug", "step-000004")):
        os.makedirs(folder)
    storage.mark_complete(train.latents, {"usable": 4})
    yaml_before = open(layout.run_yaml).read()
    with pytest.raises(RunDirError, match=r"only train\.\* settings.*generate\.steps"):
        reopen(run_dir, ["generate.steps=2"], record=True)
    cfg, manifest = reopen(run_dir, ["train.learning_rate=0.001"], record=True)
    assert cfg.train.learning_rate == 0.001
    change = manifest.data["config_changes"][0]
    assert change["changes"] == {"train.learning_rate": [0.01, 0.001]} and change["rounds"] == [1]
    assert not os.path.exists(train.checkpoints) and storage.is_complete(train.latents)
    assert open(layout.run_yaml).read() == yaml_before  # run.yaml stays what the run started with
    assert reopen(run_dir)[0].train.learning_rate == 0.001  # later resumes replay the change
    # Once every round's training is complete, a training change would change nothing.
    for k in (1, 2):
        storage.mark_complete(layout.round(k).stage("train"), {"steps": 8})
    with pytest.raises(RunDirError, match="every round's training is complete"):
        reopen(run_dir, ["train.learning_rate=0.002"])


# ------------------------------------------------------------------ a killed generate resumes (subprocess)


def parts_rows(stage_dir: str) -> int:
    folder = os.path.join(stage_dir, "_parts")
    if not os.path.isdir(folder):
        return 0
    rows = 0
    for name in os.listdir(folder):
        if not name.endswith(".json"):  # a record being written: storage's temporary file, not yet renamed
            continue
        try:
            with open(os.path.join(folder, name)) as f:
                rows += json.load(f)["rows"]
        except (OSError, ValueError):
            continue
    return rows


@pytest.mark.heavy
def test_killed_generate_resumes_with_only_the_missing_rows(ray_local, tmp_path):
    """`artaug generate` of 40 prompts in a subprocess, SIGKILLed once 20 rows are in complete parts;
    the same command again (in this process, on the session's Ray) generates only the rest."""
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("".join(f"a small red house number {i}\n" for i in range(40)))
    out = str(tmp_path / "out")
    stage_dir = os.path.join(out, "generate")
    sets = ["generate.num_actors=1", "generate.blocks=10", "generate.batch_size=4", "generate.width=16",
            "generate.height=16", "generate.steps=1", "ray.num_cpus=2"]  # fmt: skip
    args = ["generate", "--prompts", str(prompts), "--out", out, *[f"--set={item}" for item in sets]]
    command = [sys.executable, "-m", "artaug.cli", *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               start_new_session=True, env=env)  # fmt: skip
    deadline = time.monotonic() + 240
    while parts_rows(stage_dir) < 20:
        assert process.poll() is None and time.monotonic() < deadline, process.stdout.read()[-3000:]
        time.sleep(0.05)
    os.killpg(process.pid, signal.SIGKILL)  # the driver and the Ray it started
    process.wait()
    assert not storage.is_complete(stage_dir)
    kept = {
        n: os.path.getmtime(os.path.join(stage_dir, n))
        for n in os.listdir(stage_dir)
        if n.endswith(".parquet")
    }
    recorded = parts_rows(stage_dir)
    assert 20 <= recorded < 40
    with open(os.path.join(stage_dir, "part-killed-00000.parquet"), "wb") as f:
        f.write(b"PAR1 cut short")  # what a kill between a part and its record leaves
    temporary = os.path.join(stage_dir, "_parts", ".part-killed-00000.json.x1y2.tmp")
    with open(temporary, "w") as f:
        f.write("{")  # what a kill in the middle of writing a record leaves (storage.write_bytes)

    assert cli(args) == 0
    summary = storage.read_summary(stage_dir)
    assert summary["rows_reused"] >= recorded and summary["rows_generated"] == 40 - summary["rows_reused"]
    assert summary["rows"] == 40 and summary["errors"] == 0
    from artaug.stages.contract import read_stage

    ids = read_stage(stage_dir, columns=["prompt_id"]).column("prompt_id").to_pylist()
    assert len(ids) == len(set(ids)) == 40
    assert not os.path.exists(os.path.join(stage_dir, "part-killed-00000.parquet"))
    assert not [n for n in os.listdir(os.path.join(stage_dir, "_parts")) if not n.endswith(".json")]
    records = [
        json.load(open(os.path.join(stage_dir, "_parts", n)))
        for n in os.listdir(os.path.join(stage_dir, "_parts"))
    ]
    new_rows = sum(r["rows"] for r in records if r["file"] not in kept)  # what the model made this time
    assert new_rows == summary["rows_generated"] == 40 - summary["rows_reused"]
    for record in records:  # complete parts were kept as they were, not regenerated
        if record["file"] in kept:
            assert os.path.getmtime(os.path.join(stage_dir, record["file"])) == kept[record["file"]]
