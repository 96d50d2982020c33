"""Row stages written in parts, so a stage stopped part-way keeps the rows it finished.

A part is one Parquet file of finished rows (`part-<attempt>-<n>.parquet`, one output block of the
stage's dataset, written by the driver as blocks arrive). Only once the part is whole is its record
written: `_parts/<part stem>.json` with the file name, its size, the row ids it holds and the stage's
fingerprint (a hash of what the rows depend on: model, settings, input). Each file is written whole
(a local rename, one PUT on object stores), so a kill leaves at worst a part without a record.

A re-run of an incomplete stage (`resume`) keeps the parts whose record is intact, matches the
fingerprint and whose file has the recorded size; it deletes everything else in the stage folder (the
hidden temporary of a file a kill caught mid-write too) and returns the ids already done, so only the
other rows go through the model. The completion marker,
written after the last part (`artaug.stages.contract`), covers all of them. Readers never see the
records: Parquet readers skip names starting with "_".

A later stage can `follow` a stage while another thread still writes it: it gets the parts that
thread writes as each becomes whole (its record says when), then the rest once the stage is
complete. Parts kept from an earlier attempt wait for the end, so a part the writer's `resume` is
about to delete is never read.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import posixpath
import time
import uuid
from collections.abc import Iterator
from typing import Protocol

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import ray

from artaug import storage
from artaug.errors import ArtaugError

log = logging.getLogger(__name__)

RECORDS = "_parts"
ID = "prompt_id"


class WriterStoppedError(ArtaugError, RuntimeError):
    """The stage being followed stopped without completing (its writer's own error says why)."""


def fingerprint(*what) -> str:
    """A short hash of what a stage's rows depend on (JSON-able values, dataclasses as dicts)."""
    return hashlib.sha256(json.dumps(what, sort_keys=True, default=repr).encode()).hexdigest()[:16]


def resume(stage_dir: str, key: str) -> set[str]:
    """Keep the complete parts an earlier attempt wrote with fingerprint `key`; delete the rest of
    `stage_dir` (parts without a record, other fingerprints, stray files); return their row ids."""
    found = storage.list_files(stage_dir)
    kept, done = set(), set()
    for name in sorted(n for n in found if n.startswith(RECORDS + "/") and n.endswith(".json")):
        record = _record(storage.join(stage_dir, name))
        part = record.get("file") if record else None
        ids = set(record.get("ids") or ()) if record else set()
        if (
            record is None
            or record.get("key") != key
            or found.get(part) != record.get("bytes")
            or ids & done  # rows written twice: keep the first part only
        ):
            continue
        kept.update((name, part))
        done |= ids
    for name in found:
        if name not in kept and name != storage.SUCCESS:
            storage.remove(storage.join(stage_dir, name))
    storage.remove_leftover_temporaries(stage_dir)  # a part or record the kill caught mid-write
    if done:
        log.info("%s: %d row(s) in %d complete part(s) kept from an earlier attempt", stage_dir,
                 len(done), len(kept) // 2)  # fmt: skip
    return done


def _record(path: str) -> dict | None:
    try:
        record = json.loads(storage.read_bytes(path))
    except (FileNotFoundError, ValueError):
        return None  # cut by a kill: its part is redone
    return record if isinstance(record, dict) and isinstance(record.get("file"), str) else None


def without(dataset: ray.data.Dataset, done: set[str]) -> ray.data.Dataset:
    """The dataset's rows whose id is not in `done` (dropped before they reach the model)."""
    if not done:
        return dataset
    ids = pa.array(sorted(done), type=pa.string())
    return dataset.map_batches(
        lambda t: t.filter(pc.invert(pc.is_in(t[ID], value_set=ids))), batch_format="pyarrow", batch_size=None
    )


def write(dataset: ray.data.Dataset, stage_dir: str, key: str) -> int:
    """Write the dataset's output blocks as parts as they arrive; returns the number of rows written."""
    attempt, rows = uuid.uuid4().hex[:8], 0
    for n, block in enumerate(dataset.iter_batches(batch_size=None, batch_format="pyarrow")):
        if block.num_rows:
            write_part(stage_dir, f"part-{attempt}-{n:05d}", block, key)
            rows += block.num_rows
    return rows


def write_part(stage_dir: str, stem: str, table: pa.Table, key: str) -> None:
    """One part: the Parquet file, then its record."""
    buffer = io.BytesIO()
    pq.write_table(table, buffer)
    data = buffer.getvalue()
    name = f"{stem}.parquet"
    storage.write_bytes(storage.join(stage_dir, name), data)
    record = {"file": name, "bytes": len(data), "rows": table.num_rows, "ids": table.column(ID).to_pylist(),
              "key": key, "written": time.time()}  # fmt: skip
    storage.write_text(storage.join(stage_dir, posixpath.join(RECORDS, f"{stem}.json")), json.dumps(record))


class Writer(Protocol):
    """Another thread writing a stage (the loop's `Background`)."""

    started: float  # when it began (epoch seconds): parts whose record is older are an earlier attempt's

    def running(self) -> bool: ...


def follow(stage_dir: str, writer: Writer, poll_s: float = 0.5) -> Iterator[list[str]]:
    """The Parquet files of a stage that `writer` is writing: lists of the parts it wrote that became
    whole (each part once, as soon as it is polled), then, once it stopped running, the finished
    stage's remaining files. Raises WriterStoppedError when it stopped without completing the stage."""
    seen, older = set(), set()
    while True:
        still_writing = writer.running()  # asked first: a part written before the end is listed below
        fresh = []
        for name in sorted(storage.list_files(stage_dir)):
            if not (name.startswith(RECORDS + "/") and name.endswith(".json")) or name in older:
                continue
            record = _record(storage.join(stage_dir, name))
            if record is None or record.get("written", 0.0) < writer.started:
                older.add(name)  # an earlier attempt's: read at the end, if the finished stage keeps it
            elif record["file"] not in seen:
                fresh.append(record["file"])
        if fresh:
            seen.update(fresh)
            yield [storage.join(stage_dir, name) for name in fresh]
        if not still_writing:
            break
        if not fresh:
            time.sleep(poll_s)
    if not storage.is_complete(stage_dir):
        raise WriterStoppedError(f"{stage_dir}: the stage stopped before it was complete")
    storage.read_summary(stage_dir)  # the files its marker lists are whole
    names = storage.list_files(stage_dir)
    rest = sorted(n for n in names if n.endswith(".parquet") and not n.startswith(RECORDS) and n not in seen)
    if rest:
        yield [storage.join(stage_dir, name) for name in rest]
