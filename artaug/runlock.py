"""One writer per run directory: `artaug run` (new or --resume) and every stage command that writes
into a run directory hold its lock until they exit; a second writer is refused with one line naming
the holder (host, pid, since when). `artaug report` takes none: it only rewrites report/, so it can
watch a run in progress.

Three kinds, by where the run directory lives (`RunLayout.lock` names the file or object):
- a local disk: an OS lock (the filelock package) that the kernel drops when its process dies (a
  forked child, e.g. an orphaned engine core, does not keep it: filelock 4 drops it in the child),
  and beside it an owner record that names the holder;
- a shared file system (`ray.shared_filesystem`): a lease file created with O_EXCL (flock is not
  dependable on NFS), renewed while the run lives and taken over once stale: its owner process gone
  on the same host, or not renewed for `LEASE_SECONDS`;
- an object store: a lease object created by a conditional PUT (S3 If-None-Match, GCS
  ifGenerationMatch=0), renewed and taken over the same way with the object's version as condition.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import posixpath
import socket
import threading
import time
import uuid
from collections.abc import Iterator

import filelock
import yaml

from artaug import storage
from artaug.errors import ArtaugError
from artaug.layout import RunLayout
from artaug.leases import GcsStore, S3Store
from artaug.leases import holder as _parse

log = logging.getLogger(__name__)
LEASE_SECONDS = 120.0  # a lease not renewed for this long belongs to a dead writer
RENEW_SECONDS = 30.0
DAMAGED_GRACE_SECONDS = 10.0  # an unreadable lease younger than this may be mid-write


class RunLockError(ArtaugError):
    """Another process is writing this run directory (or the lock cannot be taken)."""


def _record(token: str, since: str) -> dict:
    return {"host": socket.gethostname(), "pid": os.getpid(), "since": since, "token": token,
            "expires": time.time() + LEASE_SECONDS}  # fmt: skip


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a killed child not yet reaped is a zombie: gone for our purpose
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except (OSError, IndexError):
        return True


def _stale(holder: dict | None, age: float) -> bool:
    if holder is None:
        return age > DAMAGED_GRACE_SECONDS
    if holder["host"] == socket.gethostname() and not _alive(int(holder["pid"])):
        return True
    return time.time() > float(holder.get("expires", float("inf")))


def _refused(run_dir: str, holder: dict | None) -> RunLockError:
    who = (
        f"artaug pid {holder['pid']} on {holder['host']} since {holder.get('since', '?')}"
        if holder
        else "another artaug process (its lock record is not readable yet)"
    )
    return RunLockError(
        f"run dir {run_dir} is in use by {who}: one writer per run directory; wait for it to finish"
        " or stop that process"
    )


class _OsLock:
    """A local disk: flock through filelock, released by the kernel even on SIGKILL."""

    def __init__(self, run_dir: str):
        self.run_dir, self.path = run_dir, RunLayout(run_dir).lock
        self.owner = self.path + ".owner"
        self.lock = filelock.FileLock(self.path, timeout=0)

    def acquire(self) -> None:
        os.makedirs(self.run_dir, exist_ok=True)
        try:
            self.lock.acquire()
        except filelock.Timeout:
            try:
                holder = _parse(storage.read_bytes(self.owner))
            except FileNotFoundError:
                holder = None
            raise _refused(self.run_dir, holder) from None
        storage.write_text(self.owner, json.dumps(_record(uuid.uuid4().hex, _now())))

    def release(self) -> None:
        storage.remove(self.owner)
        self.lock.release()


class _FileStore:
    """A lease file on a shared file system; its version is the owner token inside it."""

    def __init__(self, path: str):
        self.path = path

    def create(self, body: bytes) -> str | None:
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return None
        with os.fdopen(fd, "wb") as f:
            f.write(body)
            f.flush()
            os.fsync(f.fileno())
        return _parse(body)["token"]

    def get(self) -> tuple[dict | None, str, float] | None:
        try:
            with open(self.path, "rb") as f:
                body, st = f.read(), os.fstat(f.fileno())
        except FileNotFoundError:
            return None
        holder = _parse(body)
        version = holder["token"] if holder else f"damaged-{st.st_ino}-{st.st_mtime_ns}"
        return holder, version, time.time() - st.st_mtime

    def swap(self, body: bytes, version: str, own: bool) -> str | None:
        found = self.get()
        if found is None or found[1] != version:
            return None
        if own:  # renewal: replace in place, the file never goes missing
            storage.write_bytes(self.path, body)
            return _parse(body)["token"]
        aside = f"{self.path}.{uuid.uuid4().hex}.stale"
        try:
            os.rename(self.path, aside)  # atomic: one of several contenders moves the stale lease
        except FileNotFoundError:
            return None
        holder = _parse(open(aside, "rb").read())
        moved = holder["token"] if holder else None
        if moved != version and not (holder is None and version.startswith("damaged-")):
            with contextlib.suppress(FileExistsError):
                os.link(aside, self.path)  # we moved a live lease taken meanwhile: put it back
            os.unlink(aside)
            return None
        os.unlink(aside)
        return self.create(body)

    def delete(self, version: str) -> None:
        found = self.get()
        if found is not None and found[1] == version:
            os.unlink(self.path)


class _Lease:
    """A lease on a shared file system or an object store, renewed by a daemon thread."""

    def __init__(self, run_dir: str, store):
        self.run_dir, self.store = run_dir, store
        self.token, self.since, self.version = uuid.uuid4().hex, _now(), None
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._renew, name="artaug-run-lease", daemon=True)

    def _body(self) -> bytes:
        return json.dumps(_record(self.token, self.since)).encode()

    def acquire(self) -> None:
        holder = None
        for _ in range(3):
            self.version = self.store.create(self._body())
            if self.version is not None:
                self.thread.start()
                return
            found = self.store.get()
            if found is None:
                continue  # released meanwhile: try again
            holder, version, age = found
            if not _stale(holder, age):
                break
            log.warning("%s: taking over the stale lock of %s", self.run_dir, holder or "an unknown writer")
            self.version = self.store.swap(self._body(), version, own=False)
            if self.version is not None:
                self.thread.start()
                return
        raise _refused(self.run_dir, holder)

    def _renew(self) -> None:
        while not self.stop.wait(RENEW_SECONDS):
            version = self.store.swap(self._body(), self.version, own=True)
            if version is None:
                log.error("%s: another process took over this run's lock; stop one of them", self.run_dir)
                return
            self.version = version

    def release(self) -> None:
        self.stop.set()
        if self.thread.is_alive():
            self.thread.join()
        with contextlib.suppress(Exception):  # an expired lease is taken over by the next writer anyway
            self.store.delete(self.version)


def _lock(run_dir: str, shared_filesystem: bool):
    path = RunLayout(run_dir).lock
    if path.startswith("s3://"):
        return _Lease(run_dir, S3Store(path))
    if path.startswith("gs://"):
        return _Lease(run_dir, GcsStore(path))
    if storage.is_uri(path):
        raise RunLockError(f"{run_dir}: run directories live on a local disk, s3:// or gs://")
    if shared_filesystem:
        os.makedirs(run_dir, exist_ok=True)
        return _Lease(run_dir, _FileStore(path))
    return _OsLock(run_dir)


@contextlib.contextmanager
def hold(run_dir: str, shared_filesystem: bool = False) -> Iterator[None]:
    """Hold the run directory's lock for the duration of the block (refused: RunLockError)."""
    lock = _lock(storage.absolute(run_dir), shared_filesystem)
    lock.acquire()
    try:
        yield
    finally:
        lock.release()


def find_run_dir(path: str) -> str | None:
    """The run directory `path` is or lies in (the nearest folder holding a manifest.json)."""
    path = storage.absolute(path).rstrip("/") or "/"
    while True:
        try:
            if storage.exists(RunLayout(path).manifest):
                return path
        except OSError:  # a folder (or bucket prefix) we may not read: look further up
            pass
        parent = posixpath.dirname(path) if storage.is_uri(path) else os.path.dirname(path)
        if parent == path or (storage.is_uri(path) and not storage.is_uri(parent)):
            return None
        path = parent


def shared_filesystem_of(run_dir: str) -> bool:
    """The run's own `ray.shared_filesystem` (from its run.yaml), which decides the kind of lock."""
    try:
        data = yaml.safe_load(storage.read_bytes(RunLayout(run_dir).run_yaml))
        return bool(data["ray"]["shared_filesystem"])
    except (FileNotFoundError, yaml.YAMLError, KeyError, TypeError):
        return False


@contextlib.contextmanager
def writing_into(out: str, stage_is_out: bool = False) -> Iterator[str | None]:
    """For a stage command writing into `out`: hold the lock of the run directory `out` lies in, if
    any (yields it). `stage_is_out`: the stage writes `out` itself, which must not be the run's root."""
    run_dir = find_run_dir(out)
    if run_dir is None:
        yield None
        return
    if stage_is_out and run_dir == storage.absolute(out).rstrip("/"):
        raise RunLockError(
            f"{out} is a run directory: give the stage a folder of its own inside it, or another --out"
        )
    with hold(run_dir, shared_filesystem_of(run_dir)):
        yield run_dir


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")
