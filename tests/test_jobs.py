"""`ray job submit` against a real local Ray head, as a user submits to a cluster (tests/job_runs.py,
run beside the other tests by tests/background.py): the world loop as a job that reads and writes S3.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from artaug import storage


@pytest.mark.heavy
def test_world_loop_as_a_submitted_job_writes_to_s3_and_never_the_token(submitted_job):
    job, out = submitted_job, submitted_job.out
    assert job.status_without_token == 401  # no token, no jobs
    assert job.returncode == 0, job.output[-4000:]
    assert "succeeded" in job.output, job.output[-4000:]
    print(f"job finished in {job.seconds:.1f} s")

    # The whole run directory on S3: stages, the combined LoRA, the evaluation, the report.
    assert storage.exists(f"{out}/run.yaml")
    summary = storage.read_summary(f"{out}/round-1/generate")
    assert (summary["rows"], summary["images"], summary["errors"]) == (2, 2, 0)
    for stage in ("critique", "enhance", "filter", "train", "register"):
        assert storage.is_complete(f"{out}/round-1/{stage}"), stage
    critiques = storage.read_summary(f"{out}/round-1/critique")  # the vLLM critic read both pictures
    assert (critiques["backend"], critiques["rows"], critiques["failed"]) == ("vllm", 2, 0), critiques
    manifest = json.loads(storage.read_bytes(f"{out}/manifest.json"))
    assert manifest["status"] == "finished"
    # One engine served the critique and the judge (jobs/world.yaml: the same tiny VLM); busy while asked.
    (engine,) = manifest["engines"]
    assert engine["role"] == "critic" and 0 < engine["busy_s"] < engine["held_s"], engine
    assert storage.exists(f"{out}/lora/combined.safetensors")
    assert storage.is_complete(f"{out}/evaluate") and storage.exists(f"{out}/report/index.html")
    judge = json.loads(storage.read_bytes(f"{out}/evaluate/metrics.json"))["judge"]  # the vLLM judge
    assert judge["judged"] + judge["missing"] == 2, judge  # loop.eval_max_prompts held-out images

    # The token reached the job's environment (the head's env is the node's) but nothing kept it:
    # not the job's logs, its runtime_env listing, the run directory, or any of Ray's own logs.
    assert job.hf_token not in job.output
    assert job.hf_token not in job.listing and "HF_TOKEN" not in job.listing
    fs, prefix = storage.resolve(out)
    import pyarrow.fs as pafs

    listing = fs.get_file_info(pafs.FileSelector(prefix, recursive=True))
    written = [info.path for info in listing if info.is_file]
    assert written
    for path in written:
        with fs.open_input_stream(path) as f:
            assert job.hf_token.encode() not in f.read(), path
    for log in Path(job.head_logs).rglob("*"):
        if log.is_file() and not log.is_symlink():
            assert job.hf_token.encode() not in log.read_bytes(), log
    shutil.rmtree(job.head_logs, ignore_errors=True)
