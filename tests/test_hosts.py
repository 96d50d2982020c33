"""Warm model hosts (`artaug.stages.hosts`): models loaded once per host for many stage calls, LoRAs
set in place with the bits of a fresh load, a host lost mid-stage replaced without losing rows."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
import threading
import time

import ray

from artaug import storage
from artaug.models.lineage import model_of_round
from artaug.prompts import read_prompts
from artaug.stages.contract import read_stage, run_stage
from artaug.stages.generate import generate
from artaug.stages.hosts import Hosts, hosts_hold_gpus, hosts_summary
from tests.conftest import tiny_config
from tests.test_models import make_lora


def images(folder: str) -> dict[str, bytes]:
    table = read_stage(folder, columns=["prompt_id", "image"])
    return {row["prompt_id"]: row["image"] for row in table.to_pylist()}


def test_one_host_serves_every_round_with_the_weights_of_a_fresh_load(ray_local, prompt_file, tmp_path):
    prompts = read_prompts(prompt_file)
    prompts.rows = prompts.rows[:4]
    base = tiny_config(**{"generate.num_actors": 1})
    lora = make_lora(tmp_path / "round1", seed=1)
    round2 = dataclasses.replace(base, model=model_of_round(base.model, [lora]))
    hosts = Hosts(base)
    try:
        runs = [("base", base), ("round2", round2), ("base-again", base), ("round2-again", round2)]
        stages = [generate(cfg, prompts, str(tmp_path / name), hosts=hosts) for name, cfg in runs]
        summary = hosts_summary(hosts.stats())["synthesis"]
        use_and_release = lambda: _generate_then_release(base, prompts, tmp_path / "released", hosts)  # noqa: E731
        released = run_stage("uses-then-releases", str(tmp_path / "outer"), use_and_release)
    finally:
        hosts.close()
    assert released["first_work_s"] >= 0  # asked after its hosts were gone: kept when they were released
    assert summary["loads"] == {"synthesis": 1} and summary["processes"] == 1
    assert summary["weight_sets"] == 3 and summary["rows"] == 16
    # Start-up until the first batch's work (the host's start and load in the first stage only) and
    # until the first part written (that batch's work too).
    assert all(0 <= s["first_work_s"] <= s["first_output_s"] for s in stages), stages
    assert stages[0]["first_work_s"] > max(s["first_work_s"] for s in stages[1:]), stages
    generate(round2, prompts, str(tmp_path / "fresh"))  # hosts of its own: a fresh load of round 2
    assert images(str(tmp_path / "base")) == images(str(tmp_path / "base-again"))
    assert images(str(tmp_path / "round2")) == images(str(tmp_path / "round2-again"))
    assert images(str(tmp_path / "round2")) == images(str(tmp_path / "fresh"))
    assert images(str(tmp_path / "round2")) != images(str(tmp_path / "base"))


def _generate_then_release(cfg, prompts, folder, hosts: Hosts) -> dict:
    """As the train stage on GPUs: uses the hosts (a stage inside this one), then releases them."""
    generate(cfg, prompts, str(folder), hosts=hosts)
    hosts.release()
    return {}


def test_a_host_killed_mid_stage_is_replaced_and_every_row_is_written(ray_local, prompt_file, tmp_path):
    prompts = read_prompts(prompt_file)
    cfg = tiny_config(**{"generate.num_actors": 1, "generate.batch_size": 1, "generate.steps": 30})
    hosts = Hosts(cfg)
    outcome: dict = {}

    def run() -> None:
        outcome["summary"] = generate(cfg, prompts, str(tmp_path / "out"), hosts=hosts)

    worker = threading.Thread(target=run)
    worker.start()
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and not _busy(hosts):
        time.sleep(0.2)
    (before,) = hosts.pool("synthesis").stats()
    ray.kill(hosts.pool("synthesis").handles[0], no_restart=False)  # the process dies; Ray restarts it once
    killed_mid_stage = not storage.is_complete(str(tmp_path / "out"))
    worker.join(timeout=600)
    (after,) = hosts.pool("synthesis").stats()
    hosts.close()
    assert killed_mid_stage and 0 < before["rows"] < 20
    assert outcome["summary"]["images"] == len(prompts.rows) == 20
    assert after["pid"] != before["pid"] and after["loads"] == {"synthesis": 1}  # a new process, loaded again
    assert images(str(tmp_path / "out")).keys() == {row["prompt_id"] for row in prompts.rows}


def _busy(hosts: Hosts) -> bool:
    pool = hosts.pools.get("synthesis")
    return bool(pool) and any(s["calls"] > 0 for s in pool.stats())


def test_the_tasks_that_call_hosts_import_no_torch():
    """Ray Data's calling tasks stay light: the work class travels by name, the host imports it."""
    probe = "import sys, artaug.stages.hosts; print([m for m in ('torch', 'diffusers') if m in sys.modules])"
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert result.stdout.strip() == "[]", result.stderr[-2000:]


def test_hosts_are_released_before_training_only_where_training_needs_their_gpus():
    assert not hosts_hold_gpus(tiny_config())  # the CPU default keeps its hosts through training
    shared = {"generate.resources.gpus": 1, "train.resources.gpus": 1}
    assert hosts_hold_gpus(tiny_config(**shared))  # one node group for both (flux-dev)
    apart = {**shared, "generate.resources.node_labels": "artaug-node-type=gen",
             "train.resources.node_labels": "artaug-node-type=train"}  # fmt: skip
    assert not hosts_hold_gpus(tiny_config(**apart))


def test_every_pool_reports_its_time_held_and_busy():
    """Model hosts, critic engines and each round's training workers, as the manifest records them."""
    from artaug.loop.observe import pool_usage
    from artaug.loop.report import summary_table

    manifest = {
        "hosts": {"synthesis": {"hosts": 2, "loads": {"synthesis": 2}, "calls": 10, "held_s": 100.0,
                                "busy_s": 25.0}},
        "engines": [{"role": "critic", "model": "tiny-vlm", "restarts": 0, "held_s": 50.0, "busy_s": 10.0}],
        "rounds": {"1": {"train": {"status": "complete", "seconds": 40.0,
                                   "metrics": {"steps": 8, "busy_s": 30.0}}},
                   "2": {"train": {"status": "skipped"}}},
    }  # fmt: skip
    pools = pool_usage(manifest)
    assert [(p["pool"], p["busy_fraction"]) for p in pools] == [
        ("synthesis hosts", 0.25), ("critic engine", 0.2), ("round 1 training", 0.75),
    ]  # fmt: skip
    table = summary_table(manifest)
    assert "synthesis hosts: 2 host(s), 2 model load(s), 10 calls, busy 25% of 100 s held" in table
    assert "critic engine: tiny-vlm, 0 restart(s), busy 20% of 50 s held" in table
    assert "round 1 training: 8 steps, busy 75% of 40 s held" in table
