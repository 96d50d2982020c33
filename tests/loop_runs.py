"""The `artaug run` processes that tests/test_loop.py asserts on, run as background pieces
(tests/background.py): the shared CI-sized run, and a copy of its round 1 resumed, killed and resumed.

Each is a real `artaug run` process of the default preset, the miniature world (its own local Ray, the
world critic, regional enhancement, the filter with its gates on, Ray Train + DeepSpeed, the evaluation
with its verdict and the tiny VLM judge on the session's vLLM server) on a CI-sized config.
"""

from __future__ import annotations

import dataclasses
import glob
import json
import os
import shutil
import signal
import subprocess
import sys
import time

from tests.background import HEAVY

# Two rounds over the same 24 prompts and seeds (so round 2's first images show what round 1's LoRA
# changed), the evaluation on 16 held-out images with the tiny VLM judge (noise, but its requests and
# parsing run end to end) on the session's vLLM server (the run's own judge engine is tested by
# tests/test_jobs.py). The filter's gates stay on; the loop's stopping rules are off here so that
# both rounds train (two rounds, resume and combine are what this run checks; the stopping rules have
# their own test in tests/test_loop.py). One request at a time keeps vLLM's batching, hence every
# answer, the same from run to run. The stages overlap as on a cluster (flux-dev's setting), so this
# run shows they can.
CI_SIZED = [
    "loop.rounds=2", "loop.max_prompts=24", "loop.new_prompts_each_round=false",
    "loop.eval_max_prompts=16", "loop.report_pairs=2",
    "loop.min_acceptance_rate=0", "loop.min_aesthetic_gain=-1",
    "generate.num_actors=1", "critique.concurrency=1", "train.checkpoint_every=20",
    "train.num_workers=1", "train.grad_accumulation=2",
    "evaluate.judge=true", "evaluate.bootstrap_samples=200", "loop.overlap_stages=true",
]  # fmt: skip


def artaug(*args: str, start=subprocess.Popen, **popen) -> subprocess.Popen:
    """`python -m artaug.cli ARGS`, its output piped as text unless `popen` says otherwise; `start` is
    subprocess.Popen, or HEAVY.popen in a background piece."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    popen = {"stdout": subprocess.PIPE, "stderr": subprocess.STDOUT, "text": True, **popen}
    return start([sys.executable, "-m", "artaug.cli", *args], env=env, **popen)


def run_args(out: str, settings: list[str]) -> list[str]:
    return ["run", "--out", out, *(arg for item in settings for arg in ("--set", item))]


def finish(process: subprocess.Popen, timeout: float = 900) -> str:
    output, _ = process.communicate(timeout=timeout)
    assert process.returncode == 0, output[-6000:]
    return output


def manifest(run_dir: str) -> dict:
    with open(os.path.join(run_dir, "manifest.json")) as f:
        return json.load(f)


def ci_sized_run(run_dir: str, judge_settings: list[str]) -> tuple[str, str]:
    """One uninterrupted CI-sized run: (run directory, its console output)."""
    return run_dir, finish(artaug(*run_args(run_dir, CI_SIZED + judge_settings), start=HEAVY.popen))


@dataclasses.dataclass(frozen=True)
class ResumeDrill:
    """What `kill_and_resume` saw; tests/test_loop.py asserts on it."""

    run_dir: str
    killed_log: str  # the killed attempt's console
    killed_manifest: dict  # the manifest as the kill left it
    enhance_marker_left: bool  # round 2's enhance had its _SUCCESS marker when the run was killed
    done_before: dict[str, float]  # "round-k/stage": its marker's mtime before the last attempt
    done_after: dict[str, float]  # the same markers' mtimes after it
    output: str  # the last attempt's console
    killed_part_left: bool  # the half-written part file was still there at the end
    reference_unchanged: bool  # no file of the reference run was written or touched


def kill_and_resume(reference: str, run_dir: str, log_path: str) -> ResumeDrill:
    """The shared run's round 1 copied to `run_dir` as a run stopped after round 1, resumed, SIGKILLed
    (driver, Ray, hosts) inside round 2's enhance, a half-written part file left there, resumed again."""
    from artaug.layout import ROUND_STAGES

    _stopped_after_round_1(reference, run_dir)
    reference_files = _stamps(reference)  # the resumed run reads and writes only its own directory
    done_before = {f"round-1/{s}": _success_mtime(run_dir, "round-1", s) for s in ROUND_STAGES}

    with open(log_path, "w") as log:
        process = artaug("run", "--resume", run_dir, start=HEAVY.popen, stdout=log)
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        try:
            if manifest(run_dir)["rounds"]["2"]["enhance"]["status"] == "running":
                break
        except (FileNotFoundError, KeyError, json.JSONDecodeError):
            pass
        assert process.poll() is None, open(log_path).read()[-4000:]
        time.sleep(0.1)
    # Inside enhance: on warm hosts round 2's whole enhance takes ~2 s here, its first batch ~0.7 s.
    time.sleep(0.2)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()  # the run starts no vLLM engine (its judge asks the session's server): no orphan
    killed_manifest = manifest(run_dir)
    for stage in ("generate", "critique"):
        if killed_manifest["rounds"]["2"][stage]["status"] == "complete":
            done_before[f"round-2/{stage}"] = _success_mtime(run_dir, "round-2", stage)
    enhance_dir = os.path.join(run_dir, "round-2", "enhance")
    enhance_marker_left = os.path.exists(os.path.join(enhance_dir, "_SUCCESS"))
    os.makedirs(enhance_dir, exist_ok=True)  # what a killed writer leaves: a part file, no marker
    with open(os.path.join(enhance_dir, "part-killed.parquet"), "wb") as f:
        f.write(b"PAR1 half written")

    output = finish(artaug("run", "--resume", run_dir, start=HEAVY.popen))
    return ResumeDrill(
        run_dir=run_dir,
        killed_log=open(log_path).read(),
        killed_manifest=killed_manifest,
        enhance_marker_left=enhance_marker_left,
        done_before=done_before,
        done_after={stage: _success_mtime(run_dir, *stage.split("/")) for stage in done_before},
        output=output,
        killed_part_left=os.path.exists(os.path.join(enhance_dir, "part-killed.parquet")),
        reference_unchanged=_stamps(reference) == reference_files,
    )


def _stopped_after_round_1(reference: str, run_dir: str) -> None:
    """`run_dir`: the finished run `reference` as it was when round 1 had finished and the run was
    interrupted: its run.yaml and round-1/ (every stage, training's outputs and checkpoints included),
    and its manifest without round 2 and the final stages. The reference's own path, which stage
    markers and the manifest hold, becomes `run_dir` (the markers list their files' sizes, so they are
    written again, innermost first); nothing in the copy leads back to the reference."""
    from artaug import storage
    from artaug.loop.manifest import Manifest

    os.makedirs(run_dir)
    shutil.copy2(os.path.join(reference, "run.yaml"), run_dir)
    shutil.copytree(os.path.join(reference, "round-1"), os.path.join(run_dir, "round-1"))
    markers = glob.glob(os.path.join(run_dir, "round-1", "**", storage.SUCCESS), recursive=True)
    for marker in sorted(markers, key=lambda path: -path.count(os.sep)):  # train/latents before train
        with open(marker) as f:
            summary = json.loads(f.read().replace(reference, run_dir))
        summary.pop(storage.FILES)
        storage.mark_complete(os.path.dirname(marker), summary)
    with open(os.path.join(reference, "manifest.json")) as f:
        data = json.loads(f.read().replace(reference, run_dir))
    assert data["status"] == "finished" and len(data["attempts"]) == 1
    data.pop("finished")
    data.update(status="interrupted", rounds={"1": data["rounds"]["1"]}, final={})
    Manifest(run_dir, data).save()
    assert Manifest.load(run_dir).live_attempt() is None
    for folder, _, files in os.walk(run_dir):
        for name in files:
            with open(os.path.join(folder, name), "rb") as f:
                assert reference.encode() not in f.read(), os.path.join(folder, name)


def _success_mtime(run_dir: str, *stage: str) -> float:
    return os.path.getmtime(os.path.join(run_dir, *stage, "_SUCCESS"))


def _stamps(folder: str) -> dict[str, tuple[int, int]]:
    """{relative path: (size, mtime in ns)} of every file under `folder`."""
    return {
        os.path.relpath(os.path.join(d, f), folder): (os.stat(os.path.join(d, f)).st_size,
                                                      os.stat(os.path.join(d, f)).st_mtime_ns)
        for d, _, files in os.walk(folder) for f in files
    }  # fmt: skip
