"""Hostile cases for the run's state: processes killed mid-write, damaged state files, cut Parquet
parts, concurrent writers (local disk, shared file system, S3) and stage commands pointed at a run.
Each asserts the one-line error and that nothing was lost or written where it should not be. No Ray."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from types import SimpleNamespace

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from artaug import storage
from artaug.errors import ArtaugError
from artaug.runlock import RunLockError, hold
from artaug.stages import parts
from artaug.stages.contract import StageDoneError, read_stage, resolve_input, reusable_summary, run_stage
from tests.conftest import tiny_config

HOLDER = """
import sys, time
from artaug.runlock import hold
with hold(sys.argv[1], sys.argv[2] == "shared"):
    print("held", flush=True)
    time.sleep(120)
"""


def artaug(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "artaug.cli", *args], capture_output=True, text=True, timeout=180
    )


def cli_error(capsys, argv: list[str], *needles: str) -> str:
    """The real command line in this process (its heavy imports are shared with other tests)."""
    from artaug.cli import main

    capsys.readouterr()
    code = main(argv)
    out, err = capsys.readouterr()
    return one_line_error(subprocess.CompletedProcess(argv, code, out, err), *needles)


def one_line_error(result: subprocess.CompletedProcess, *needles: str) -> str:
    """Exit code 2, one `artaug: error:` line holding every needle, no traceback."""
    assert result.returncode == 2, result.stdout[-2000:] + result.stderr[-3000:]
    lines = [line for line in result.stderr.splitlines() if line.startswith("artaug: error:")]
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr[-3000:]
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


def snapshot(folder) -> dict[str, bytes]:
    return {
        os.path.relpath(os.path.join(d, n), folder): open(os.path.join(d, n), "rb").read()
        for d, _, names in os.walk(folder) for n in names
    }  # fmt: skip


@pytest.fixture
def holder():
    """Start a real process holding a run directory's lock; yields start(run_dir, shared) -> Popen."""
    started = []

    def start(run_dir: str, shared: bool = False) -> subprocess.Popen:
        mode = "shared" if shared else "local"
        proc = subprocess.Popen(
            [sys.executable, "-c", HOLDER, run_dir, mode], stdout=subprocess.PIPE, text=True
        )
        started.append(proc)
        assert proc.stdout.readline().strip() == "held"
        return proc

    yield start
    for proc in started:
        proc.kill()
        proc.wait()


def completed_stage(folder: str, parts: int = 2) -> dict[str, bytes]:
    """A completed stage (two Parquet parts, metrics.json) written under the contract; its files."""

    def work() -> dict:
        os.makedirs(folder, exist_ok=True)
        for i in range(parts):
            table = pa.table({"prompt_id": [f"p{i}-{j}" for j in range(50)], "value": list(range(50))})
            pq.write_table(table, os.path.join(folder, f"part-{i}.parquet"))
        storage.write_text(os.path.join(folder, "metrics.json"), json.dumps({"score": 1.0}))
        return {"rows": 50 * parts}

    run_stage("generate", folder, work)
    return snapshot(folder)


# ---------------------------------------------------------------------- atomic writes

WRITER = """
import sys
from artaug import storage
a, b = b'{"v": "' + b"a" * 8_000_000 + b'"}', b'{"v": "' + b"b" * 12_000_000 + b'"}'
storage.write_bytes(sys.argv[1], a)
print("ready", flush=True)
while True:
    storage.write_bytes(sys.argv[1], b)
    storage.write_bytes(sys.argv[1], a)
"""


def test_a_process_killed_while_rewriting_the_manifest_leaves_the_old_or_the_new_one(tmp_path):
    path = str(tmp_path / "manifest.json")
    for delay in (0.15, 0.4, 0.7):
        proc = subprocess.Popen([sys.executable, "-c", WRITER, path], stdout=subprocess.PIPE, text=True)
        assert proc.stdout.readline().strip() == "ready"
        time.sleep(delay)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        data = open(path, "rb").read()
        assert len(data) in (8_000_009, 12_000_009), len(data)  # whole, never empty or cut
        assert json.loads(data)["v"][0] in "ab"
        leftovers = [n for n in os.listdir(tmp_path) if n != "manifest.json"]
        assert all(n.startswith(".manifest.json.") for n in leftovers)  # hidden: readers skip them


# ---------------------------------------------------------------------- damaged state files


@pytest.mark.parametrize("content", [b"", b'{"format": 2, "stat', b"\xff\xfe\x00", b"[1, 2]"])
def test_a_damaged_manifest_is_one_line_that_says_what_to_do(tmp_path, content):
    from artaug.loop.manifest import Manifest, RunDirError

    (tmp_path / "manifest.json").write_bytes(content)
    with pytest.raises(RunDirError) as err:
        Manifest.load(str(tmp_path))
    assert "manifest.json is damaged" in str(err.value) and "start a new run" in str(err.value)
    assert "\n" not in str(err.value)
    assert (tmp_path / "manifest.json").read_bytes() == content  # left for the user to restore


def test_resume_of_a_run_with_an_empty_manifest_is_refused_without_a_traceback(tmp_path, capsys):
    from artaug.loop.rundir import start

    run_dir = str(tmp_path / "run")
    start(tiny_config(), run_dir)
    open(os.path.join(run_dir, "manifest.json"), "wb").close()  # what a kill mid-write used to leave
    before = snapshot(run_dir)
    cli_error(capsys, ["run", "--resume", run_dir], "manifest.json is damaged", "start a new run")
    assert snapshot(run_dir) == before


@pytest.mark.parametrize("damage", ["empty", "cut", "not an object"])
def test_a_damaged_success_marker_is_refused_by_a_stage_and_rerun_by_the_loop(tmp_path, damage):
    folder = str(tmp_path / "generate")
    completed_stage(folder)
    marker = os.path.join(folder, storage.SUCCESS)
    whole = open(marker, "rb").read()
    open(marker, "wb").write({"empty": b"", "cut": whole[: len(whole) // 2], "not an object": b"3"}[damage])
    before = snapshot(folder)
    calls = []
    with pytest.raises(ArtaugError) as err:  # a stage command: one line, nothing replaced
        run_stage("generate", folder, lambda: calls.append(1) or {})
    assert f"stage dir {folder}: _SUCCESS is damaged" in str(err.value) and "--overwrite" in str(err.value)
    assert not isinstance(err.value, StageDoneError) and calls == [] and snapshot(folder) == before
    with pytest.raises(ArtaugError, match="_SUCCESS is damaged"):
        resolve_input(str(tmp_path), "generate")
    assert reusable_summary(folder) is None  # the loop: incomplete, marker dropped, stage runs again
    assert not storage.is_complete(folder)
    assert snapshot(folder) == {k: v for k, v in before.items() if k != storage.SUCCESS}


@pytest.mark.parametrize("victim", ["part-1.parquet", "metrics.json"])
@pytest.mark.parametrize("how", ["cut", "missing"])
def test_a_cut_or_missing_file_of_a_completed_stage_is_named(tmp_path, victim, how):
    folder = str(tmp_path / "generate")
    completed_stage(folder)
    path = os.path.join(folder, victim)
    if how == "cut":
        data = open(path, "rb").read()
        open(path, "wb").write(data[: len(data) // 2])
    else:
        os.remove(path)
    for read in (lambda: resolve_input(str(tmp_path), "generate"), lambda: read_stage(folder),
                 lambda: run_stage("generate", folder, dict)):  # fmt: skip
        with pytest.raises(ArtaugError) as err:
            read()
        message = str(err.value)
        assert victim in message and "re-run the stage" in message and "\n" not in message, message
    assert reusable_summary(folder) is None  # the loop re-runs it


def test_the_loop_reruns_a_stage_whose_part_was_cut_and_reuses_an_intact_one(tmp_path):
    from artaug.loop.manifest import Manifest
    from artaug.loop.runner import Loop

    cfg, run_dir = tiny_config(), str(tmp_path / "run")
    loop = Loop(cfg, run_dir, Manifest.create(run_dir, cfg))
    folder = loop.layout.round(1).stage("generate")
    runs = []

    def work():
        runs.append(1)
        return run_stage("generate", folder, lambda: completed_stage_work(folder), overwrite=True)

    loop._step(1, "generate", folder, "round 1", work)
    loop._step(1, "generate", folder, "round 1", work)
    assert len(runs) == 1  # intact: reused
    part = os.path.join(folder, "part-0.parquet")
    open(part, "r+b").truncate(100)
    summary = loop._step(1, "generate", folder, "round 1", work)
    assert len(runs) == 2 and summary["rows"] == 50  # cut: run again, whole again
    assert os.path.getsize(part) > 100 and storage.read_summary(folder)["rows"] == 50


def test_a_stage_records_when_its_first_file_was_written_not_an_earlier_attempts(tmp_path):
    """first_output_s: the stage's start-up (pools, imports, loads) until its first rows of this attempt."""
    folder = str(tmp_path / "enhance")
    os.makedirs(folder)
    kept = os.path.join(folder, "part-earlier.parquet")  # a part kept from an earlier attempt
    pq.write_table(pa.table({"prompt_id": ["p0"]}), kept)
    os.utime(kept, (time.time() - 600, time.time() - 600))

    def work() -> dict:
        time.sleep(0.5)
        storage.write_text(os.path.join(folder, "run.yaml"), "{}")  # not rows: not output
        time.sleep(0.5)
        pq.write_table(pa.table({"prompt_id": ["p1"]}), os.path.join(folder, "part-new.parquet"))
        time.sleep(0.5)
        return {"rows": 2}

    summary = run_stage("enhance", folder, work, resumable=True)
    assert 1.0 <= summary["first_output_s"] < summary["seconds"] - 0.4, summary
    assert storage.read_summary(folder)["first_output_s"] == summary["first_output_s"]
    assert "first_output_s" not in run_stage("generate", str(tmp_path / "empty"), dict)  # no file, no figure


def test_first_work_s_is_the_earliest_probe_and_a_nested_stage_s_counts_for_its_outer_one(tmp_path):
    """first_work_s: until a host began the first batch (a probe tells when, as map_on_hosts adds one);
    evaluate runs its generations as stages of their own, whose first work is also evaluate's."""
    from artaug.stages.contract import current_clock

    def inner() -> dict:
        started = current_clock().started_at
        current_clock().probes.extend([lambda: started + 0.7, lambda: None, lambda: started + 0.9])
        return {}

    def outer() -> dict:
        time.sleep(0.3)
        assert run_stage("generate", str(tmp_path / "inner"), inner)["first_work_s"] == 0.7
        return {}

    summary = run_stage("evaluate", str(tmp_path / "outer"), outer)
    assert 0.95 <= summary["first_work_s"] <= 1.3, summary  # the inner stage began 0.3 s in
    assert current_clock() is None
    assert "first_work_s" not in run_stage("filter", str(tmp_path / "alone"), dict)  # no host, no figure


def test_a_follower_reads_this_attempt_s_parts_as_they_land_and_earlier_ones_at_the_end(tmp_path):
    """`parts.follow`: a part written since following began comes out while the writer still writes;
    a part kept from an earlier attempt (its writer may yet delete it) only once the stage is complete."""
    folder = str(tmp_path / "generate")
    table = lambda *ids: pa.table({"prompt_id": list(ids)})  # noqa: E731
    parts.write_part(folder, "part-earlier-00000", table("p0"), "key")
    old = os.path.join(folder, "_parts", "part-earlier-00000.json")
    record = json.load(open(old))
    json.dump({**record, "written": time.time() - 600}, open(old, "w"))
    writing, batches = threading.Event(), []
    writing.set()
    writer = SimpleNamespace(started=time.time(), running=writing.is_set)
    follower = parts.follow(folder, writer, poll_s=0.05)
    parts.write_part(folder, "part-now-00000", table("p1", "p2"), "key")
    batches.append([os.path.basename(f) for f in next(follower)])  # while the writer is still writing
    parts.write_part(folder, "part-now-00001", table("p3"), "key")
    storage.mark_complete(folder, {"rows": 4})
    writing.clear()
    batches += [[os.path.basename(f) for f in files] for files in follower]
    assert batches == [["part-now-00000.parquet"], ["part-now-00001.parquet"], ["part-earlier-00000.parquet"]]


def test_a_follower_of_a_stage_that_stopped_part_way_raises(tmp_path):
    folder = str(tmp_path / "generate")
    parts.write_part(folder, "part-a-00000", pa.table({"prompt_id": ["p1"]}), "key")
    follower = parts.follow(folder, SimpleNamespace(started=0.0, running=lambda: False))
    next(follower)  # what was written is read
    with pytest.raises(parts.WriterStoppedError, match="stopped before it was complete"):
        next(follower)


def completed_stage_work(folder: str) -> dict:
    os.makedirs(folder, exist_ok=True)
    pq.write_table(
        pa.table({"prompt_id": [f"p{j}" for j in range(50)]}), os.path.join(folder, "part-0.parquet")
    )
    return {"rows": 50}


def test_a_marker_written_before_file_lists_still_reads(tmp_path):
    folder = tmp_path / "old"
    folder.mkdir()
    pq.write_table(pa.table({"prompt_id": ["a"]}), folder / "part-0.parquet")
    (folder / storage.SUCCESS).write_text(json.dumps({"stage": "generate", "rows": 1}))
    assert storage.read_summary(str(folder)) == {"stage": "generate", "rows": 1}
    assert resolve_input(str(folder), "generate", ("prompt_id",)) == str(folder)


# ---------------------------------------------------------------------- one writer per run


def test_a_second_resume_of_a_local_run_is_refused_with_the_holder_named(tmp_path, holder, capsys):
    from artaug.loop.rundir import start

    run_dir = str(tmp_path / "run")
    start(tiny_config(), run_dir)
    first = holder(run_dir)
    before = snapshot(run_dir)
    holder_named = f"artaug pid {first.pid} on {socket.gethostname()}"
    line = cli_error(capsys, ["run", "--resume", run_dir], holder_named)
    assert "since" in line and "one writer per run directory" in line
    assert snapshot(run_dir) == before  # nothing discarded, the manifest untouched
    first.send_signal(signal.SIGKILL)  # the kernel drops a dead holder's lock at once
    first.wait()
    with hold(run_dir):
        pass


def test_a_second_run_into_the_same_new_directory_is_refused(tmp_path, holder, capsys):
    run_dir = str(tmp_path / "new")
    first = holder(run_dir)  # the first `artaug run --out new` has its lock, not yet its run.yaml
    cli_error(capsys, ["run", "--out", run_dir], f"artaug pid {first.pid}")
    assert sorted(os.listdir(run_dir)) == [".artaug-lock", ".artaug-lock.owner"]  # no run.yaml, manifest


def test_a_stage_command_into_a_run_on_a_shared_file_system_is_refused(tmp_path, holder, prompt_file):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "manifest.json").write_text("{}")
    (run_dir / "run.yaml").write_text("ray:\n  shared_filesystem: true\n")
    first = holder(str(run_dir), shared=True)
    lease = json.loads((run_dir / ".artaug-lock").read_text())  # an O_EXCL lease file, not flock
    assert lease["pid"] == first.pid and lease["expires"] > time.time()
    before = snapshot(run_dir)
    out = str(run_dir / "round-9")
    one_line_error(artaug("generate", "--prompts", prompt_file, "--out", out), f"artaug pid {first.pid}")
    assert snapshot(run_dir) == before and not os.path.exists(out)
    first.send_signal(signal.SIGKILL)
    first.wait()
    with hold(str(run_dir), shared_filesystem=True):  # its owner is gone on this host: taken over
        assert json.loads((run_dir / ".artaug-lock").read_text())["pid"] == os.getpid()
    assert not (run_dir / ".artaug-lock").exists()


def test_a_lease_of_another_host_is_honoured_until_it_expires(tmp_path):
    lease = tmp_path / ".artaug-lock"
    record = {"host": "elsewhere", "pid": 1, "since": "yesterday", "token": "t"}
    lease.write_text(json.dumps({**record, "expires": time.time() + 60}))
    with pytest.raises(RunLockError, match="artaug pid 1 on elsewhere since yesterday"):
        with hold(str(tmp_path), shared_filesystem=True):
            pass
    lease.write_text(json.dumps({**record, "expires": time.time() - 1}))
    with hold(str(tmp_path), shared_filesystem=True):
        assert json.loads(lease.read_text())["host"] == socket.gethostname()


def test_two_writers_of_an_s3_run_directory(s3_bucket, holder, prompt_file):
    import boto3

    run_dir = f"{s3_bucket}/hostile/run"
    storage.write_text(f"{run_dir}/manifest.json", "{}")
    storage.write_text(f"{run_dir}/run.yaml", "name: x\n")
    s3, bucket, prefix = boto3.client("s3"), s3_bucket[len("s3://") :], "hostile/run/"

    def objects() -> dict[str, str]:
        return {o["Key"]: o["ETag"] for o in s3.list_objects_v2(Bucket=bucket, Prefix=prefix)["Contents"]}

    first = holder(run_dir)
    lease = json.loads(s3.get_object(Bucket=bucket, Key=prefix + ".artaug-lock")["Body"].read())
    assert lease["pid"] == first.pid  # a lease object made by a conditional PUT
    before = objects()
    out = f"{run_dir}/round-1"
    one_line_error(artaug("critique", "--images", prompt_file, "--out", out), f"artaug pid {first.pid}")
    assert objects() == before  # nothing written, the lease untouched
    first.send_signal(signal.SIGKILL)
    first.wait()
    with hold(run_dir):  # the dead owner's lease is taken over (If-Match on its ETag)
        taken = json.loads(s3.get_object(Bucket=bucket, Key=prefix + ".artaug-lock")["Body"].read())
        assert taken["pid"] == os.getpid()
    assert prefix + ".artaug-lock" not in objects()  # released


# ---------------------------------------------------------------------- run.yaml


def test_stage_commands_leave_the_runs_run_yaml_alone(tmp_path):
    from artaug.cli.stages import _write_config
    from artaug.loop.rundir import start

    run_dir = str(tmp_path / "run")
    start(tiny_config(), run_dir)
    before = snapshot(run_dir)
    other = tiny_config(**{"loop.rounds": 3})
    _write_config(other, run_dir)  # `artaug generate --out RUN_DIR`
    _write_config(other, os.path.join(run_dir, "round-1"))  # `--out RUN_DIR/round-1`
    assert snapshot(run_dir) == before
    one_line_error(
        artaug("evaluate", "--base", "tiny", "--out", run_dir, "--overwrite"), "is a run directory"
    )
    assert snapshot(run_dir) == before  # not replaced, not removed by --overwrite


def test_a_resumed_evaluation_generates_again_where_its_finished_generation_was_cut(tmp_path):
    from types import SimpleNamespace

    from artaug.stages.evaluate.run import _reusable

    folder = str(tmp_path / "evaluate" / "base" / "generate")
    os.makedirs(folder)
    run_stage(
        "generate", folder, lambda: {"rows": 50, "prompts_source": "p.txt", **completed_stage_work(folder)}
    )
    prompts = SimpleNamespace(source="p.txt", rows=[None] * 50)
    assert _reusable(folder, prompts)
    open(os.path.join(folder, "part-0.parquet"), "r+b").truncate(10)
    assert not _reusable(folder, prompts)  # not an error that stops the resume: generated again
    assert not storage.is_complete(folder)


ORPHANING_HOLDER = """
import os, sys, time
from artaug.runlock import hold
with hold(sys.argv[1]):
    child = os.fork()
    if child == 0:  # a forked child (e.g. an engine core) shares the lock and outlives its parent
        os.write(1, b"child running\\n")  # after os.fork's hooks, which drop the lock in the child
        time.sleep(60)
        os._exit(0)
    os.write(1, f"{child}\\n".encode())  # one write each: print's two (text, end) can interleave
    os._exit(0)
"""


def test_a_forked_child_that_outlives_the_run_does_not_keep_its_lock(tmp_path):
    """A SIGKILLed run can leave children (an engine core): they must not block `--resume`."""
    run_dir = str(tmp_path / "run")
    parent = subprocess.Popen(
        [sys.executable, "-c", ORPHANING_HOLDER, run_dir], stdout=subprocess.PIPE, text=True
    )
    # Both lines, in either order: the child's says it has passed the fork hooks (on a busy machine
    # it may not have run yet when its parent exits). Other lines (a library's notice) are skipped.
    lines = []
    while not ("child running" in lines and any(line.isdigit() for line in lines)):
        line = parent.stdout.readline()
        assert line, f"the lock holder's output ended early: {lines}"
        lines.append(line.strip())
    (child,) = (int(line) for line in lines if line.isdigit())
    parent.wait()
    try:
        assert _alive_pid(child)
        with hold(run_dir):
            pass
    finally:
        os.kill(child, signal.SIGKILL)


def _alive_pid(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True
