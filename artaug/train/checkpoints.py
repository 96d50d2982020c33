"""Which training checkpoint a run resumes from: the latest complete one, never a partial one.

Ray Train uploads each rank's checkpoint folder file by file, and a kill, a lost node or a full disk
can leave a folder that lacks files or holds a cut one. DeepSpeed, asked to load such a folder, only
warns and trains on from fresh weights while the step counter says N. So every rank writes, after
its checkpoint files, a marker `complete-rank-R.json` listing them (relative name -> size) and the
number of ranks; a checkpoint counts as complete only when every rank's marker is there and every
file it lists has the recorded size, whatever order the upload took.

The training output's driver (`artaug.train.trainer`) calls `prepare` before Ray Train starts: it
falls back to the latest complete checkpoint (saying which and why), removes the incomplete ones
after it, and refuses with one line when none is usable although training had progressed. Workers
call `latest_complete` too, for the restarts Ray Train makes inside one fit. `FaultInjection` kills a
rank once its checkpoints are committed (drills and tests of exactly this).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import posixpath
import re
import signal
from dataclasses import dataclass

import pyarrow.fs as pafs
import ray.train
from ray.train import CheckpointConsistencyMode

from artaug import storage
from artaug.config import RunConfig
from artaug.errors import ArtaugError

log = logging.getLogger(__name__)

MARKER = "complete-rank-{rank}.json"
RAY_SNAPSHOT = "checkpoint_manager_snapshot.json"  # Ray Train's list of the checkpoints it reported
DIVERGED = "diverged.json"  # rank 0's note of the step where the loss or a weight went non-finite
_STEP_DIR = re.compile(r"^step-(\d+)(-final)?$")

# Fields that change how a run is executed, not what it computes: a run may resume with other values.
_OPERATIONAL = {
    "checkpoint_every", "keep_checkpoints", "max_failures", "encode_batch_size",
    "pair_retries", "fits_per_gpu",
}  # fmt: skip


class CheckpointConflictError(ArtaugError, RuntimeError):
    """OUT/checkpoints holds a run made with another training configuration or other pairs."""


def config_hash(cfg: RunConfig, cache_summary: dict) -> str:
    """What the trained LoRA depends on: the model, the training settings and the cached pairs."""
    train = {k: v for k, v in dataclasses.asdict(cfg.train).items() if k not in _OPERATIONAL}
    what = {
        "model": dataclasses.asdict(cfg.model),
        "train": train,
        "pairs": [cache_summary.get("pairs_source"), cache_summary.get("usable")],
    }
    return hashlib.sha256(json.dumps(what, sort_keys=True).encode()).hexdigest()[:16]


def claim(checkpoints: str, digest: str) -> None:
    """Record which configuration OUT/checkpoints belongs to; refuse to resume another one's run."""
    marker = storage.join(checkpoints, "_config_hash")
    if storage.exists(marker):
        found = storage.read_bytes(marker).decode().strip()
        if found != digest:
            raise CheckpointConflictError(
                f"{checkpoints} holds checkpoints of another training configuration or pair set"
                f" ({found}, this run {digest}): use --overwrite or another --out"
            )
    else:
        storage.write_text(marker, digest + "\n")


class CheckpointError(ArtaugError, RuntimeError):
    """Training claims progress but no checkpoint it wrote is complete."""


@dataclass
class FaultInjection:
    """For drills and tests: rank `rank` kills its own process (SIGKILL) right after optimizer step
    `step`, once: the marker file (on storage every worker sees) records that it happened. The kill
    waits until Ray Train has committed every checkpoint reported so far, so the step a run resumes
    from is deterministic (a report still in flight when a worker dies is lost)."""

    rank: int
    step: int
    marker: str


def maybe_fault(faults: list[FaultInjection], rank: int, step: int) -> None:
    for f in faults:
        if f.rank == rank and f.step == step and not storage.exists(f.marker):
            ray.train.get_all_reported_checkpoints(consistency_mode=CheckpointConsistencyMode.COMMITTED)
            storage.write_text(f.marker, f"killed rank {rank} after step {step}\n")
            os.kill(os.getpid(), signal.SIGKILL)


def write_marker(folder: str, rank: int, world: int, step: int) -> None:
    """Record this rank's files in a local checkpoint folder, last (before Ray Train uploads it)."""
    files = {}
    for root, _, names in os.walk(folder):
        for name in names:
            path = os.path.join(root, name)
            files[os.path.relpath(path, folder).replace(os.sep, "/")] = os.path.getsize(path)
    marker = {"rank": rank, "world": world, "step": step, "files": files}
    with open(os.path.join(folder, MARKER.format(rank=rank)), "w") as f:
        json.dump(marker, f, sort_keys=True)


def problem(checkpoint: str) -> str | None:
    """Why the checkpoint folder (local path or URI) is not complete; None when it is."""
    found = storage.list_files(checkpoint)
    first = _marker(checkpoint, 0, found)
    if isinstance(first, str):
        return first
    for rank in range(first["world"]):
        marker = first if rank == 0 else _marker(checkpoint, rank, found)
        if isinstance(marker, str):
            return marker
        for name, size in sorted(marker["files"].items()):
            if name not in found:
                return f"{name} is missing"
            if found[name] != size:
                return f"{name} has {found[name]} bytes, rank {rank} wrote {size}"
    return None


def _marker(checkpoint: str, rank: int, found: dict[str, int]) -> dict | str:
    name = MARKER.format(rank=rank)
    if name not in found:
        return f"no {name} (rank {rank} did not finish writing it)"
    try:
        marker = json.loads(storage.read_bytes(storage.join(checkpoint, name)))
        if not isinstance(marker.get("files"), dict) or int(marker["world"]) < 1:
            raise ValueError("fields missing")
    except (ValueError, KeyError, TypeError) as err:
        return f"{name} is damaged ({err})"
    return marker


def step_of(name: str) -> int | None:
    match = _STEP_DIR.match(name)
    return int(match.group(1)) if match else None


def latest_complete(experiment: str) -> tuple[str | None, list[tuple[str, str]]]:
    """(the latest complete checkpoint folder or None, [(newer incomplete folder, why)])."""
    skipped = []
    for name in sorted(_step_dirs(experiment), key=lambda n: (step_of(n), n), reverse=True):
        path = storage.join(experiment, name)
        why = problem(path)
        if why is None:
            return path, skipped
        skipped.append((path, why))
    return None, skipped


def prepare(experiment: str) -> str | None:
    """Before a fit: the checkpoint it will resume from (None: from scratch), incomplete ones removed.

    Ray Train refuses to start when its snapshot names a checkpoint folder that is gone, so the
    snapshot is dropped whenever it names one that is not complete; the workers then resume from
    the folder chosen here, not from the snapshot.
    """
    storage.remove(storage.join(experiment, DIVERGED))  # an earlier attempt's: this one decides anew
    chosen, skipped = latest_complete(experiment)
    claimed = max([_snapshot_step(experiment)] + [step_of(posixpath.basename(p)) or 0 for p, _ in skipped])
    if chosen is None and claimed > 0:
        reasons = "; ".join(f"{posixpath.basename(p)}: {why}" for p, why in skipped) or "none left"
        raise CheckpointError(
            f"{experiment}: training had reached step {claimed} but no checkpoint is complete ({reasons}):"
            " start training over (`artaug train ... --overwrite`; `artaug run --resume` does it after"
            " you remove the round's train/checkpoints folder)"
        )
    for path, why in skipped:
        log.warning(
            "checkpoint %s is incomplete (%s): removed; resuming from %s",
            path, why, chosen or "the start",
        )  # fmt: skip
        storage.remove_tree(path)
    if skipped or not _snapshot_consistent(experiment):
        storage.remove(storage.join(experiment, RAY_SNAPSHOT))
    if chosen is not None:
        log.info("resuming from the complete checkpoint %s", chosen)
    return chosen


def _step_dirs(experiment: str) -> list[str]:
    fs, path = storage.resolve(experiment)
    if fs.get_file_info(path).type != pafs.FileType.Directory:
        return []
    infos = fs.get_file_info(pafs.FileSelector(path))
    return [i.base_name for i in infos if i.type == pafs.FileType.Directory and step_of(i.base_name)]


def _snapshot(experiment: str) -> dict | None:
    """Ray's snapshot ({} when there is none, None when it is damaged)."""
    try:
        data = json.loads(storage.read_bytes(storage.join(experiment, RAY_SNAPSHOT)))
    except FileNotFoundError:
        return {}
    except ValueError:
        return None
    return data if isinstance(data, dict) else None


def _snapshot_step(experiment: str) -> int:
    latest = (_snapshot(experiment) or {}).get("latest_checkpoint_result") or {}
    return int((latest.get("metrics") or {}).get("step") or 0)


def _snapshot_consistent(experiment: str) -> bool:
    """Every checkpoint Ray's snapshot lists exists (Ray Train fails to start otherwise)."""
    snapshot = _snapshot(experiment)
    if snapshot is None:
        return False
    listed = snapshot.get("checkpoint_results") or []
    names = {r.get("checkpoint_dir_name") for r in listed}
    return all(name and storage.exists(storage.join(experiment, name)) for name in names)
