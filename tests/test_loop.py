"""`artaug run` end to end: the whole loop, SIGKILL and --resume, refusals, report in Chromium, metrics.

The runs asserted on here (tests/loop_runs.py) start with the session and run beside the other tests
(tests/background.py); pytest runs these tests last, when the runs are usually done.
"""

from __future__ import annotations

import json
import os
import subprocess
import time

import pytest
import torch
from safetensors.torch import load_file, save_file

from artaug import storage
from artaug.config import load_config
from artaug.layout import ROUND_STAGES, RunLayout
from tests.conftest import free_port
from tests.loop_runs import artaug, manifest, run_args


@pytest.mark.heavy
def test_run_completes_every_stage(finished_run):
    run_dir, output = finished_run
    data = manifest(run_dir)
    assert data["status"] == "finished"
    for k in ("1", "2"):
        stages = data["rounds"][k]
        assert set(stages) == {"generate", "critique", "enhance", "filter", "train", "register"}
        assert all(s["status"] == "complete" and s["attempt"] == 0 for s in stages.values()), stages
        assert stages["generate"]["rows"] == 24 and stages["critique"]["metrics"]["backend"] == "world"
        assert 0 < stages["filter"]["metrics"]["acceptance_rate"] < 1  # the gates on: some pass, not all
        # The stages overlapped: the critique read generate's parts in batches, the first while generate
        # still ran (in round 1 its model load leaves no doubt), and the latent cache filled while the
        # filter ran (the train stage reused it).
        assert stages["critique"]["metrics"]["input_batches"] >= (2 if k == "1" else 1), stages["critique"]
        assert stages["train"]["latent_cache"]["pairs"] == 24, stages["train"]
        assert storage.read_summary(RunLayout(run_dir).round(int(k)).train.latents)["encoded_while_written"]
    assert [data["final"][s]["status"] for s in ("combine", "evaluate", "report")] == ["complete"] * 3
    # Round 2 started from round 1's LoRA; the combined adapter holds both rounds.
    registered = data["rounds"]["2"]["register"]["metrics"]["loras"]
    assert len(registered) == 2 and registered[0] == RunLayout(run_dir).round(1).train.lora
    assert data["final"]["combine"]["metrics"]["inputs"] == registered
    # Facts a reader needs to trust the outputs, and no secret among them.
    assert {"torch", "diffusers", "ray", "deepspeed"} <= set(data["packages"])
    assert data["models"]["synthesis"]["source"] == "world" and data["host"]["cpus"] >= 1
    assert len(data["config_hash"]) == 16
    # Warm hosts: one synthesis host loaded the world model once for both rounds' generate, enhance
    # and latent cache and the evaluation's base and enhanced generations; one scorer host served filter and
    # evaluate (no scorer loaded twice).
    synthesis, scorers = data["hosts"]["synthesis"], data["hosts"]["scorers"]
    assert synthesis["hosts"] == synthesis["processes"] == 1 and synthesis["loads"] == {"synthesis": 1}
    assert synthesis["calls"] >= 4 and synthesis["weight_sets"] >= 3 and 0 < synthesis["busy_fraction"] < 1
    assert scorers["hosts"] == scorers["processes"] == 1 and scorers["loads"]["scorer"] == 4
    # The same host encoded each round's latent cache (its 24 pairs): no encoder loaded per round.
    assert synthesis["work"]["LatentEncoder"]["rows"] == 2 * 24 == synthesis["work"]["Enhancer"]["rows"]
    for k in ("1", "2"):  # training's busy time: its steps, out of the worker group's life
        train = data["rounds"][k]["train"]
        assert 0 < train["metrics"]["busy_s"] < train["seconds"], train
    for line in (
        "report:",
        "LoRA:",
        "manifest:",
        "round  ",
        "accepted",
        "synthesis hosts: 1 host(s), 1 model load(s)",
        "round 2 training: ",
    ):
        assert line in output
    assert "artaug_stage" not in output  # metrics go to Ray, not the console


@pytest.mark.heavy
def test_the_gates_keep_only_pairs_that_gained_and_the_evaluation_gives_its_verdict(finished_run):
    """The filter's rule holds on every kept pair, the critic spoke the world's words, and the
    evaluation scored with the world's own scorers, gave its verdict and ran the vLLM judge."""
    from artaug import world
    from artaug.stages.contract import read_stage

    run_dir, _ = finished_run
    layout, rule = RunLayout(run_dir), load_config("world").filter
    for k in (1, 2):
        pairs = read_stage(layout.round(k).stage("filter")).to_pylist()
        kept = [p for p in pairs if p["accepted"]]
        assert kept and len(kept) < len(pairs)
        for pair in kept:
            assert pair["world_aesthetic_after"] - pair["world_aesthetic_before"] >= rule.delta
            assert pair["world_alignment_after"] >= pair["world_alignment_before"] - rule.epsilon
            assert pair["after"] != pair["before"]  # unchanged pairs are not kept
        critiques = read_stage(layout.round(k).stage("critique")).to_pylist()
        notes = {
            a["note"] for c in critiques if c["critique"] for a in json.loads(c["critique"])["adjustments"]
        }
        assert notes and notes <= set(world.MIDDLE.values())
    metrics = _metrics(os.path.join(run_dir, "evaluate", "metrics.json"))
    assert metrics["verdict"]["aesthetic"]["column"] == "world_quality"
    assert metrics["verdict"]["alignment"]["margin"] == 0.05
    assert metrics["scores"]["world_quality"]["difference"]["clusters"] == 8  # 16 images, 8 prompts
    assert metrics["judge"]["judged"] + metrics["judge"]["missing"] == 16  # the vLLM judge ran on every image


@pytest.mark.heavy
def test_the_method_moves_images_toward_the_world_taste(finished_run):
    """The claim itself: round 2 draws better pictures than round 1 from the same prompts and seeds
    before any critique (round 1's LoRA learnt from the kept pairs), and the held-out evaluation's
    aesthetic difference (enhanced - base) is positive."""
    from artaug.stages.contract import read_stage

    run_dir, _ = finished_run
    layout = RunLayout(run_dir)
    pairs = [read_stage(layout.round(k).stage("filter")).to_pylist() for k in (1, 2)]
    before = [{p["prompt_id"]: p["world_aesthetic_before"] for p in round_pairs} for round_pairs in pairs]
    assert before[0].keys() == before[1].keys()
    gain = sum(before[1][i] - before[0][i] for i in before[0]) / len(before[0])
    assert gain > 0, f"round 2's first images are worse than round 1's by {gain:.4f}"
    metrics = _metrics(os.path.join(run_dir, "evaluate", "metrics.json"))
    assert metrics["scores"]["world_quality"]["difference"]["mean"] > 0, metrics["scores"]["world_quality"]


@pytest.mark.heavy
def test_a_world_where_nothing_improves_stops_with_the_reason(ray_local, tmp_path, capsys):
    """The silent critic asks for nothing: no pair is better, so the loop stops before training.
    `artaug run` in this process, on the session's Ray (a run joins the Ray it finds)."""
    import logging

    from artaug.cli import main as cli

    run_dir = str(tmp_path / "run")
    settings = ["critique.backend=silent", "loop.max_prompts=8", "generate.num_actors=1"]
    assert cli(run_args(run_dir, settings)) == 0
    output = capsys.readouterr().out
    data = manifest(run_dir)
    assert data["status"] == "stopped"
    assert (
        data["stopped_early"]["round"] == 1 and "loop.min_acceptance_rate" in data["stopped_early"]["reason"]
    )
    assert data["rounds"]["1"]["train"]["status"] == "skipped" and "2" not in data["rounds"]
    assert "stopped early in round 1: acceptance rate 0.000" in output
    assert "(none: no round trained)" in output
    assert os.path.exists(os.path.join(run_dir, "report", "index.html"))
    # The run's log file took its lines and nothing after it: the next run in a process has its own.
    log_file = RunLayout(run_dir).log_file
    assert "the loop stops before training this round" in open(log_file).read()
    logging.getLogger("artaug").warning("a line after the run")
    assert "a line after the run" not in open(log_file).read()


@pytest.mark.heavy
def test_combined_lora_loads_in_diffusers(finished_run):
    from artaug.models.world_flux import build_world_flux

    run_dir, _ = finished_run
    pipe = build_world_flux()
    before = {k: v.clone() for k, v in pipe.transformer.state_dict().items()}
    pipe.load_lora_weights(os.path.join(run_dir, "lora", "combined.safetensors"), adapter_name="artaug")
    pipe.fuse_lora(adapter_names=["artaug"])
    pipe.unload_lora_weights()
    after = pipe.transformer.state_dict()
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert changed, "the combined LoRA changed no weight"


@pytest.mark.heavy
def test_report_renders_in_chromium(finished_run):
    """Open report/index.html in a real headless Chromium and check that every image decoded."""
    from websockets.sync.client import connect

    run_dir, _ = finished_run
    report = os.path.join(run_dir, "report", "index.html")
    size = sum(
        os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(os.path.dirname(report)) for f in fs
    )
    assert size < 2_000_000  # thumbnails, not full-size images
    port = free_port()
    profile = os.path.join(run_dir, "..", "chromium-profile")
    browser = subprocess.Popen(
        ["/usr/bin/chromium", "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
         "--no-first-run", "--disable-background-networking", "--disable-component-update", "--disable-sync",
         f"--user-data-dir={profile}", f"--remote-debugging-port={port}", "file://" + report],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        page = _devtools_page(port)
        with connect(page["webSocketDebuggerUrl"], max_size=None) as ws:
            images = []
            for _ in range(60):
                ws.send(json.dumps({"id": 1, "method": "Runtime.evaluate", "params": {
                    "returnByValue": True,
                    "expression": "document.readyState === 'complete' && Array.from(document.images)"
                                  ".map(i => [i.getAttribute('src'), i.complete, i.naturalWidth])",
                }}))  # fmt: skip
                images = json.loads(ws.recv())["result"]["result"].get("value")
                if images:
                    break
                time.sleep(0.5)
    finally:
        browser.kill()
        browser.wait()
    assert len(images) >= 2 * 2 * 2 + 2 * 2  # two pairs a round, before + after; two held-out, base + LoRA
    assert {src for src, *_ in images if src.startswith("img/eval-")} == {
        f"img/eval-{i:04d}-{side}.png" for i in (0, 1) for side in ("base", "lora")
    }
    broken = [src for src, complete, width in images if not (complete and width > 0)]
    assert not broken, broken
    assert any(src.startswith("img/r2-") for src, *_ in images)


def _devtools_page(port: int) -> dict:
    import requests

    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            pages = requests.get(f"http://127.0.0.1:{port}/json", timeout=2).json()
            page = next((p for p in pages if p.get("type") == "page"), None)
            if page:
                return page
        except requests.RequestException:
            pass
        time.sleep(0.5)
    raise AssertionError("Chromium's DevTools endpoint did not answer")


@pytest.mark.heavy
def test_sigkill_then_resume_equals_an_uninterrupted_run(finished_run, resume_drill):
    """A run stopped after round 1 (the shared run's round 1, copied), resumed, SIGKILLed inside
    round 2's enhance and resumed again ends where the uninterrupted run ended (tests/loop_runs.py)."""
    reference, _ = finished_run
    drill = resume_drill
    run_dir, killed = drill.run_dir, drill.killed_log
    for stage in ROUND_STAGES:  # the killed attempt reused round 1 and did round 2's first stages
        assert f"[round 1/2] {stage}: complete in an earlier attempt" in killed, killed[-4000:]
    for stage in ("generate", "critique"):
        assert drill.killed_manifest["rounds"]["2"][stage]["status"] == "complete", stage
    assert drill.killed_manifest["rounds"]["2"]["enhance"]["status"] == "running"
    assert not drill.enhance_marker_left

    data = manifest(run_dir)
    assert data["status"] == "finished" and [a["resumed"] for a in data["attempts"]] == [False, True, True]
    r1, r2 = data["rounds"]["1"], data["rounds"]["2"]
    assert all(r1[s]["status"] == "complete" and r1[s]["attempt"] == 0 for s in ROUND_STAGES), r1
    assert r2["generate"]["attempt"] == 1 and r2["critique"]["attempt"] == 1
    assert all(r2[s]["attempt"] == 2 for s in ("enhance", "filter", "train", "register")), r2
    assert all(data["final"][s]["attempt"] == 2 for s in ("combine", "evaluate", "report")), data["final"]
    assert drill.done_after == drill.done_before  # completed stages were not redone
    assert len(drill.done_before) == len(ROUND_STAGES) + 2
    assert not drill.killed_part_left
    for line in ("[round 1/2] register", "[round 2/2] generate", "[round 2/2] critique"):
        assert f"{line}: complete in an earlier attempt" in drill.output
    assert r2["register"]["metrics"]["loras"] == [RunLayout(run_dir).round(k).train.lora for k in (1, 2)]
    # The same seeds give the same final outputs as the uninterrupted run, up to float rounding: rows
    # batched differently round differently (README, "Determinism"; seen in CI: 2 pixels of one image
    # off by one level), which moved the LoRA by ~1e-4 of its scale. Lost or redone work moves it more.
    ours = load_file(os.path.join(run_dir, "lora", "combined.safetensors"))
    theirs = load_file(os.path.join(reference, "lora", "combined.safetensors"))
    assert ours.keys() == theirs.keys()
    for key in ours:
        scale = float(theirs[key].abs().max())
        torch.testing.assert_close(ours[key], theirs[key], rtol=0, atol=1e-2 * scale)
    paths = (os.path.join(d, "evaluate", "metrics.json") for d in (run_dir, reference))
    (our_numbers, our_rest), (their_numbers, their_rest) = (_flat(_metrics(path)) for path in paths)
    assert our_rest == their_rest  # counts, names, verdicts
    assert our_numbers == pytest.approx(their_numbers, rel=1e-3, abs=1e-5)
    assert drill.reference_unchanged  # the resumed run read and wrote only its own directory


def _metrics(path: str) -> dict:
    with open(path) as f:
        metrics = json.load(f)
    return {k: v for k, v in metrics.items() if k not in ("seconds", "loras")}


def _flat(metrics: dict) -> tuple[dict, dict]:
    """({dotted path: float}, {dotted path: other value}): pytest.approx compares flat dicts of numbers."""
    flat = {}

    def walk(prefix: str, value) -> None:
        if isinstance(value, dict):
            for k, v in value.items():
                walk(f"{prefix}.{k}", v)
        elif isinstance(value, list):
            for i, v in enumerate(value):
                walk(f"{prefix}.{i}", v)
        else:
            flat[prefix] = value

    walk("", metrics)
    numbers = {k: v for k, v in flat.items() if isinstance(v, float)}
    return numbers, {k: v for k, v in flat.items() if k not in numbers}


# ------------------------------------------------------------------ refusals (no Ray needed)


def _refused(*args: str) -> str:
    process = artaug(*args)
    output, _ = process.communicate(timeout=120)
    assert process.returncode == 2, output
    assert "Traceback" not in output
    return output


def test_unknown_key_or_preset_is_refused_before_anything_is_written(tmp_path):
    out = tmp_path / "run"
    assert "loop.roundz: unknown field (did you mean 'rounds'?)" in _refused(
        "run", "--out", str(out), "--set", "loop.roundz=3"
    )
    assert "preset: 'flux-schnell' is not one of" in _refused(
        "run", "--out", str(out), "--preset", "flux-schnell"
    )
    assert not out.exists()


@pytest.mark.heavy
def test_resume_of_a_finished_run_changes_nothing(finished_run):
    run_dir, _ = finished_run
    before = open(os.path.join(run_dir, "manifest.json"), "rb").read()
    assert "has finished; nothing to resume" in _refused("run", "--resume", run_dir)
    assert "already holds a run" in _refused("run", "--out", run_dir)
    assert open(os.path.join(run_dir, "manifest.json"), "rb").read() == before


def test_run_directory_of_another_version_is_refused(tmp_path):
    from artaug.config import load_config
    from artaug.loop.rundir import start

    run_dir = str(tmp_path / "old-run")
    start(load_config("tiny"), run_dir)
    data = manifest(run_dir)
    data["artaug_version"] = "0.0.1"
    with open(os.path.join(run_dir, "manifest.json"), "w") as f:
        json.dump(data, f)
    before = sorted(os.listdir(run_dir))
    assert "was written by artaug 0.0.1" in _refused("run", "--resume", run_dir)
    assert sorted(os.listdir(run_dir)) == before


def test_stage_metrics_reach_rays_prometheus_endpoint(ray_local):
    import requests

    from artaug.loop.observe import record_stage

    record_stage("metrics-test", 1, "generate", {"rows": 5, "errors": 1, "seconds": 2.0})
    port = ray_local.nodes()[0]["MetricsExportPort"]
    deadline, text = time.monotonic() + 150, ""  # Ray's metrics agent exports late on a loaded machine
    while time.monotonic() < deadline and 'run="metrics-test"' not in text:
        time.sleep(2)
        text = requests.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text
    rows = [
        line
        for line in text.splitlines()
        if line.startswith("ray_artaug_stage_rows") and "metrics-test" in line
    ]
    assert rows and rows[0].rstrip().endswith(" 5.0"), rows
    assert 'stage="generate"' in rows[0] and 'round="1"' in rows[0]
    assert any(
        line.startswith("ray_artaug_stage_images_per_s") and "metrics-test" in line
        for line in text.splitlines()
    )


def test_a_run_that_starts_from_a_lora_evaluates_what_serve_serves(tmp_path):
    """With model.loras [X], the evaluation compares [X] with [X, combined]: the served model."""
    from artaug.config import load_config
    from artaug.loop.rundir import start
    from artaug.loop.runner import evaluated_models
    from artaug.serve.launch import resolve_config

    # Serving reads both files (finite values, checked before Ray starts); their layers do not matter here.
    tensors = {
        "transformer.x.lora_A.weight": torch.zeros(1, 2),
        "transformer.x.lora_B.weight": torch.zeros(2, 1),
    }
    start_lora = tmp_path / "start.safetensors"
    save_file(tensors, str(start_lora))
    run_dir = str(tmp_path / "run")
    cfg = load_config("tiny", overrides=[f"model.loras={start_lora}"])
    start(cfg, run_dir)
    layout = RunLayout(run_dir)
    os.makedirs(os.path.dirname(layout.combined_lora))
    save_file(tensors, layout.combined_lora)

    base, enhanced = evaluated_models(cfg, layout)
    assert base.loras == [str(start_lora)]
    assert enhanced.loras == [str(start_lora), layout.combined_lora]
    served = resolve_config(run_dir=run_dir).model
    assert served.loras == enhanced.loras and served.source == enhanced.source
