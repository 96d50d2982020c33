"""The stage contract: what every stage shares, so that a stage file holds only its transformation.

A stage reads rows (Parquet) from its input folder and writes rows (Parquet) into its own folder,
`stage_dir`. It counts as complete only once `stage_dir/_SUCCESS` (with the stage's summary) is
written, last. This module owns that protocol:

- `@stage("name", checks=...)` wraps a stage function `fn(cfg, ..., stage_dir, ...) -> summary`: it
  runs the stage's input checks (same arguments) before anything is removed or Ray starts, refuses a
  completed `stage_dir` unless `overwrite=True`, clears a half-written one (a resumable stage keeps
  it: training resumes from its checkpoints, generate and enhance from their complete parts,
  `artaug.stages.parts`), starts or joins Ray, times the work and writes the
  marker. Two start-up figures: `first_output_s` (until the first Parquet part of this attempt) and,
  for stages that run on warm hosts, `first_work_s` (until a host, its models loaded and set, began
  the first batch: start-up without that batch's work; `StageClock`). Whether a complete stage is
  skipped is the caller's decision (the loop's, or the user's).
- `resolve_input` finds a stage's input: the folder itself or its `<stage>` sub-folder.
- `read_stage` reads a stage's rows.
"""

from __future__ import annotations

import functools
import inspect
import logging
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field

import pyarrow as pa
import pyarrow.parquet as pq

from artaug import storage
from artaug.config import RayConfig
from artaug.errors import ArtaugError

log = logging.getLogger(__name__)


class StageDoneError(ArtaugError, FileExistsError):
    """The output folder already holds a completed stage and overwriting was not asked for."""


class StageInputError(ArtaugError, ValueError):
    """A stage's input is missing, incomplete or lacks columns; the message names the path."""


@dataclass
class StageClock:
    """A stage attempt's start (epoch seconds) and probes that tell when its first batch of work began.

    `artaug.stages.hosts.map_on_hosts` tags its calls with `tag` and adds a probe for its pool: the
    earliest time a host, its models loaded and set, began a batch with this tag (host clocks: on a
    cluster, NTP's skew between nodes applies)."""

    tag: str
    started_at: float
    probes: list[Callable[[], float | None]] = field(default_factory=list)

    def first_work_s(self) -> float | None:
        """Seconds from the start to the first batch of this attempt on any host; None without one."""
        times = [t for t in (probe() for probe in self.probes) if t is not None]
        return max(0.0, min(times) - self.started_at) if times else None


_clock = threading.local()  # overlapping stages run in threads of their own (artaug.loop.overlap)


def current_clock() -> StageClock | None:
    """The clock of the stage running in this thread, if any."""
    return getattr(_clock, "value", None)


def run_stage(name: str, stage_dir: str, work: Callable[[], dict], ray_cfg: RayConfig | None = None,
              overwrite: bool = False, resumable: bool = False) -> dict:  # fmt: skip
    """Run `work` into `stage_dir` under the contract; returns the summary written to its marker."""
    if storage.is_complete(stage_dir) and not overwrite:
        storage.read_summary(stage_dir)  # a damaged marker or cut file: say so, not "completed"
        raise StageDoneError(
            f"{stage_dir} already holds a completed stage ({name}): use --overwrite to replace it"
        )
    if overwrite or not resumable:
        storage.remove_tree(stage_dir)
    else:
        storage.remove(storage.join(stage_dir, storage.SUCCESS))
    if ray_cfg is not None:
        from artaug.cluster import init_ray  # here: a stage's input checks need no Ray

        init_ray(ray_cfg, output=stage_dir)
    start, started_at = time.perf_counter(), time.time()
    clock, outer = StageClock(f"{name}:{uuid.uuid4().hex}", started_at), current_clock()
    _clock.value = clock
    try:
        summary = {"stage": name, **work()}
    finally:
        _clock.value = outer
        if outer is not None:  # a stage run inside another (evaluate's generations): its work is the outer's
            outer.probes.extend(clock.probes)
    summary.setdefault("seconds", round(time.perf_counter() - start, 3))
    # Start-up (pools, imports, model loads): until the first rows of this attempt are out, and
    # until the first batch's work began (without that batch's own seconds).
    first = storage.first_written(stage_dir, started_at, suffix=".parquet")
    if first is not None:
        summary.setdefault("first_output_s", round(first, 3))
    first_work = clock.first_work_s()
    if first_work is not None:
        summary.setdefault("first_work_s", round(first_work, 3))
    storage.mark_complete(stage_dir, summary)
    return summary


def stage(name: str, resumable: bool = False, checks: Callable[..., None] | None = None):
    """Decorator for a stage function whose first parameter is the RunConfig and that has `stage_dir`.

    `checks(*args, **kwargs)` raises on bad input before anything changes. The wrapped function takes
    one more keyword, `overwrite` (default False).
    """

    def wrap(fn):
        signature = inspect.signature(fn)

        @functools.wraps(fn)
        def run(*args, overwrite: bool = False, **kwargs) -> dict:
            bound = signature.bind(*args, **kwargs)
            cfg, stage_dir = bound.arguments["cfg"], bound.arguments["stage_dir"]
            if checks is not None:
                checks(*args, **kwargs)
            return run_stage(name, stage_dir, lambda: fn(*args, **kwargs), cfg.ray, overwrite, resumable)

        return run

    return wrap


def resolve_input(path: str, name: str, columns: tuple[str, ...] = (), require_complete: bool = True) -> str:
    """The folder holding a `name` stage's rows: `path` itself, or `path/name`.

    With `require_complete`, the folder must carry its completion marker; without it, a folder of
    Parquet files is accepted (with a warning). Every name in `columns` must be a column of the rows.
    """
    for candidate in (path, storage.join(path, name)):
        complete = storage.is_complete(candidate)
        if require_complete and not complete:
            continue
        if complete:
            storage.read_summary(candidate)  # the files its marker lists are whole
        names = _column_names(candidate)
        if names is None:
            continue
        missing = [c for c in columns if c not in names]
        if missing:
            raise StageInputError(f"{candidate}: not {name} rows (missing columns: {', '.join(missing)})")
        if not complete:
            log.warning("%s has no _SUCCESS marker: the %s stage may not have finished", candidate, name)
        return candidate
    what = f"a completed {name} stage" if require_complete else f"{name} rows"
    raise StageInputError(f"{path}: neither it nor {storage.join(path, name)} holds {what}")


def _column_names(folder: str) -> list[str] | None:
    fs, inner = storage.resolve(folder)
    try:
        dataset = pq.ParquetDataset(inner, filesystem=fs)
    except (FileNotFoundError, OSError, pa.ArrowInvalid):
        return None
    return dataset.schema.names if dataset.files else None


def read_stage(stage_dir: str, columns: list[str] | None = None, exclude: tuple[str, ...] = ()) -> pa.Table:
    """The Parquet rows of a stage folder sorted by prompt_id: `columns` (those it has, with
    prompt_id), or every column but `exclude` (e.g. the images, when only the numbers are needed)."""
    if storage.is_complete(stage_dir):
        storage.read_summary(stage_dir)  # a cut Parquet part is named, not a reader's traceback
    fs, path = storage.resolve(stage_dir)
    dataset = pq.ParquetDataset(path, filesystem=fs)
    names = dataset.schema.names
    wanted = names if columns is None else ["prompt_id", *columns]
    wanted = [c for c in dict.fromkeys(wanted) if c in names and c not in exclude]
    return dataset.read(columns=wanted).sort_by("prompt_id")


def reusable_summary(stage_dir: str) -> dict | None:
    """The summary of a complete, intact stage; None when it must run (again). A damaged marker or
    a missing or cut file it lists is logged and the marker removed, so the stage runs again."""
    if not storage.is_complete(stage_dir):
        return None
    try:
        return storage.read_summary(stage_dir)
    except storage.StateError as err:
        log.warning("%s: running it again", err)
        storage.remove(storage.join(stage_dir, storage.SUCCESS))
        return None
