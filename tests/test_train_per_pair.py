"""`train.mode: per-pair`: one LoRA-1/LoRA-2 fit per pair on fit actors, resumable pair by pair, and
the mean of the pairs' LoRA-2 deltas (exact, or SVD-compressed with its error).

Uses the latent cache of the shared differential run (conftest's `differential`), copied.
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from artaug import storage
from artaug.cli import main as cli
from artaug.config import ModelConfig
from artaug.layout import RunLayout, TrainOutput
from artaug.lora.algebra import mean, read_factors
from artaug.lora.files import read_metadata
from artaug.models.synthesis import load_pipeline
from artaug.train.latents import read_cache
from artaug.train.per_pair import PairFitter, pair_name
from tests.conftest import tiny_config
from tests.loop_runs import manifest, run_args

PER_PAIR = ["train.mode=per-pair", "train.num_workers=1", "train.checkpoint_every=100"]


def with_cache(differential, out: str) -> str:
    """A training output folder holding a copy of the shared run's latent cache (reused, not encoded)."""
    shutil.copytree(f"{differential['out']}/latents", f"{out}/latents")
    return out


def sets(*items: str) -> list[str]:
    return [arg for item in items for arg in ("--set", item)]


@pytest.fixture(scope="module")
def killed_and_resumed(differential, tmp_path_factory):
    """`artaug train --set train.mode=per-pair` (a process with its own Ray) SIGKILLed once two pairs
    are written, then the same command again (in this process, on the session's Ray)."""
    out = with_cache(differential, str(tmp_path_factory.mktemp("per-pair") / "out"))
    args = ["train", "--pairs", differential["pairs"], "--out", out, "--preset", "tiny"]
    args += sets(*PER_PAIR, "train.steps=12", "train.before_steps=12")  # ~1 s a pair: killed midway
    process = subprocess.Popen(
        [sys.executable, "-m", "artaug.cli", *args], start_new_session=True,
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    pairs = TrainOutput(out).pairs
    deadline = time.monotonic() + 300
    while len(_pair_files(pairs)) < 2 and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    os.killpg(process.pid, signal.SIGKILL)
    killed_log, _ = process.communicate()
    # A fit actor can outlive the kill by a moment (a Ray worker notices its raylet is gone) and finish
    # the pair it holds: that file is whole (written atomically) and counts as done.
    written, settled = _pair_files(pairs), time.monotonic()
    while time.monotonic() - settled < 3:
        time.sleep(0.2)
        if _pair_files(pairs) != written:
            written, settled = _pair_files(pairs), time.monotonic()
    before = {name: (os.stat(path).st_mtime_ns, open(path, "rb").read()) for name, path in written}
    assert 2 <= len(before) < 8, killed_log[-3000:]
    code = cli(args)
    return {"out": out, "code": code, "before": before, "summary": storage.read_summary(out)}


def _pair_files(folder: str) -> list[tuple[str, str]]:
    if not os.path.isdir(folder):
        return []
    return sorted((f, os.path.join(folder, f)) for f in os.listdir(folder) if f.endswith(".safetensors"))


def test_a_killed_run_resumes_without_refitting_finished_pairs(killed_and_resumed):
    run = killed_and_resumed
    assert run["code"] == 0
    summary, before = run["summary"], run["before"]
    assert summary["pairs"] == {"fitted": 8 - len(before), "reused": len(before), "failed": 0}
    files = dict(_pair_files(TrainOutput(run["out"]).pairs))
    assert len(files) == 8
    for name, (mtime, data) in before.items():  # not fitted again, not rewritten
        assert os.stat(files[name]).st_mtime_ns == mtime and open(files[name], "rb").read() == data
    lines = [json.loads(line) for line in open(TrainOutput(run["out"]).metrics)]
    assert len(lines) == 8 - len(before)
    assert all(len(line["before"]) == 12 and len(line["after"]) == 12 for line in lines)


def test_the_kept_lora_is_the_exact_mean_of_the_pairs_lora2(killed_and_resumed):
    out = TrainOutput(killed_and_resumed["out"])
    each = [read_factors(path) for _, path in _pair_files(out.pairs)]
    kept = read_factors(out.lora)
    assert kept.keys() == each[0].keys() and kept
    for layer, (down, up) in kept.items():
        expected = sum(e[layer][1] @ e[layer][0] for e in each) / len(each)
        torch.testing.assert_close(up @ down, expected, atol=1e-7, rtol=1e-5)
    assert killed_and_resumed["summary"]["exact"] and killed_and_resumed["summary"]["rank"] == 8 * 4
    meta = read_metadata(out.lora)
    assert meta["mode"] == "per-pair" and meta["pairs"] == 8 and meta["base_model"] == "tiny(seed=0)"
    pipe = load_pipeline(ModelConfig())
    pipe.load_lora_weights(out.lora_dir)  # what a user loads, by diffusers' default file name


def test_beyond_the_exact_bound_the_mean_is_its_best_low_rank_approximation(killed_and_resumed, tmp_path):
    """Eckart-Young: the compressed mean is the SVD truncation of the exact mean, its error reported."""
    paths = [path for _, path in _pair_files(TrainOutput(killed_and_resumed["out"]).pairs)]
    summary = mean(paths, str(tmp_path / "mean.safetensors"), rank=2, exact_rank=8)
    assert not summary["exact"] and summary["rank"] == 2
    exact = read_factors(TrainOutput(killed_and_resumed["out"]).lora)
    compressed = read_factors(str(tmp_path / "mean.safetensors"))
    dropped = total = 0.0
    for layer, (down, up) in exact.items():
        full = (up @ down).numpy()
        u, s, vh = np.linalg.svd(full, full_matrices=False)
        best = (u[:, :2] * s[:2]) @ vh[:2]
        got = (compressed[layer][1] @ compressed[layer][0]).numpy()
        np.testing.assert_allclose(got, best, atol=1e-6 * max(1.0, np.abs(full).max()))
        dropped, total = dropped + (s[2:] ** 2).sum(), total + (s**2).sum()
    assert summary["relative_error"]["overall"] == pytest.approx(np.sqrt(dropped / total), rel=1e-3)
    assert 0 < summary["relative_error"]["overall"] < 1


def test_a_fit_depends_only_on_its_pair_not_on_what_the_actor_fitted_before(differential, tmp_path):
    """Fit actors reset only the adapters and the optimizer between pairs: pair B's LoRA-2 is the same
    whether B is the actor's first fit or comes after A; LoRA-1 is trained and frozen under LoRA-2."""
    settings = dict(item.split("=") for item in [*PER_PAIR, "train.steps=3", "train.before_steps=3"])
    cfg = tiny_config(**settings)
    rows = read_cache(f"{differential['out']}/latents").slice(0, 2).to_pylist()
    first, second = [PairFitter(cfg, str(tmp_path / name), "test", 1) for name in ("after-a", "alone")]
    first._one(rows[0])
    assert first._one(rows[1])["status"] == "fitted" and second._one(rows[1])["status"] == "fitted"
    name = f"{pair_name(rows[1])}.safetensors"
    a, b = read_factors(str(tmp_path / "after-a" / name)), read_factors(str(tmp_path / "alone" / name))
    for layer in a:
        torch.testing.assert_close(a[layer][1] @ a[layer][0], b[layer][1] @ b[layer][0], atol=0, rtol=0)
    lora1 = [layer.lora_B["before"].weight for layer in second.layers]
    assert any(w.abs().max() > 0 for w in lora1) and not any(w.requires_grad for w in lora1)
    assert any(layer.lora_B["after"].weight.abs().max() > 0 for layer in second.layers)


@pytest.mark.heavy
def test_artaug_run_trains_each_round_per_pair(ray_local, tmp_path, capsys):
    """One round of the default preset (the miniature world) with per-pair training, in this process."""
    run_dir = str(tmp_path / "run")
    settings = [
        *PER_PAIR, "loop.rounds=1", "loop.max_prompts=8", "generate.num_actors=1", "loop.evaluate=false",
        "loop.min_acceptance_rate=0", "loop.min_aesthetic_gain=-1", "train.steps=4", "train.before_steps=4",
    ]  # fmt: skip
    assert cli(run_args(run_dir, settings)) == 0, capsys.readouterr().out[-3000:]
    data = manifest(run_dir)
    train = data["rounds"]["1"]["train"]
    assert data["status"] == "finished" and train["status"] == "complete"
    summary = storage.read_summary(RunLayout(run_dir).round(1).train.root)
    assert summary["mode"] == "per-pair" and summary["pairs"]["fitted"] == summary["cache"]["usable"] > 0
    assert read_metadata(RunLayout(run_dir).combined_lora)["rounds"] == 1
