"""One filesystem layer for local paths and cloud URIs (s3://, gs://), through pyarrow.fs.

A local write goes to a hidden temporary name in the same folder, is fsynced and then renamed over
the target, so a kill or a full disk leaves the old content or the new, never a partial file; on
object stores one PUT is already all or nothing.

Stage outputs are complete only when their `_SUCCESS` marker exists: it is written last and records
the summary and the files it covers (relative name -> size). `read_summary` checks them, so a
truncated or missing Parquet part of a completed stage is named instead of breaking a later read.
Parquet readers skip files whose names start with "_" or "." (markers, temporary names).
"""

from __future__ import annotations

import json
import os
import posixpath
import tempfile

import pyarrow.fs as pafs

from artaug.errors import ArtaugError

SUCCESS = "_SUCCESS"
FILES = "_files"  # the marker's key for the files it covers; read_summary leaves it out
_UMASK = os.umask(0o022)
os.umask(_UMASK)  # read once: temporary files get the mode a plain open() would give


class StateError(ArtaugError):
    """A state file (marker, manifest, metrics) is damaged or a file a marker lists is missing or cut."""


def is_uri(path: str) -> bool:
    return "://" in path


def resolve(path: str) -> tuple[pafs.FileSystem, str]:
    """(filesystem, path inside it) for a local path or a URI."""
    if is_uri(path):
        return pafs.FileSystem.from_uri(path)
    return pafs.LocalFileSystem(), os.path.abspath(os.path.expanduser(path))


def absolute(path: str) -> str:
    """A local path made absolute (workers run in other working directories); URIs unchanged."""
    return path if is_uri(path) else os.path.abspath(os.path.expanduser(path))


def join(base: str, *parts: str) -> str:
    return posixpath.join(base, *parts) if is_uri(base) else os.path.join(base, *parts)


def exists(path: str) -> bool:
    fs, p = resolve(path)
    return fs.get_file_info(p).type != pafs.FileType.NotFound


def read_bytes(path: str) -> bytes:
    fs, p = resolve(path)
    if fs.get_file_info(p).type != pafs.FileType.File:
        raise FileNotFoundError(path)
    with fs.open_input_stream(p) as f:
        return f.read()


_TEMPORARY = ".tmp"  # `write_bytes` writes `.<name>.<random>.tmp` beside `name`, then renames it


def write_bytes(path: str, data: bytes) -> None:
    """Replace `path` whole: the old content or the new survives a kill, never a partial file."""
    fs, p = resolve(path)
    if is_uri(path):
        fs.create_dir(posixpath.dirname(p), recursive=True)
        with fs.open_output_stream(p) as f:  # the object appears only when the upload completes
            f.write(data)
        return
    folder = os.path.dirname(p)
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(p)}.", suffix=_TEMPORARY, dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), 0o666 & ~_UMASK)
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, p)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    _fsync_dir(folder)


def _fsync_dir(folder: str) -> None:
    """Make the rename itself durable (a power loss could otherwise bring back the old name)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some file systems cannot fsync a directory; the rename is still atomic
    finally:
        os.close(fd)


def write_text(path: str, text: str) -> None:
    write_bytes(path, text.encode("utf-8"))


def remove_tree(path: str) -> None:
    fs, p = resolve(path)
    if fs.get_file_info(p).type != pafs.FileType.NotFound:
        fs.delete_dir(p)


def remove(path: str) -> None:
    """Delete one file if it exists."""
    fs, p = resolve(path)
    if fs.get_file_info(p).type == pafs.FileType.File:
        fs.delete_file(p)


def read_json_object(path: str) -> dict:
    """A JSON object file; FileNotFoundError when absent, ValueError (the reason) when damaged."""
    data = read_bytes(path)
    if not data.strip():
        raise ValueError(f"empty, {len(data)} bytes")
    try:
        value = json.loads(data)
    except ValueError as err:  # JSONDecodeError and undecodable bytes
        raise ValueError(f"not JSON: {err}") from None
    if not isinstance(value, dict):
        raise ValueError(f"a JSON {type(value).__name__}, not an object")
    return value


def list_files(folder: str) -> dict[str, int]:
    """Every file under `folder` (relative posix name -> size), but markers' own and hidden names."""
    fs, p = resolve(folder)
    if fs.get_file_info(p).type != pafs.FileType.Directory:
        return {}
    files = {}
    for info in fs.get_file_info(pafs.FileSelector(p, recursive=True)):
        rel = posixpath.relpath(info.path, p)
        if info.type == pafs.FileType.File and rel != SUCCESS and "/." not in f"/{rel}":
            files[rel] = info.size
    return files


def remove_leftover_temporaries(folder: str) -> int:
    """Delete the temporary files a kill in the middle of `write_bytes` left under a local `folder`
    (hidden, so `list_files` never lists them); returns how many. Object stores leave none."""
    if is_uri(folder) or not os.path.isdir(folder):
        return 0
    removed = 0
    for parent, _, names in os.walk(folder):
        for name in names:
            if name.startswith(".") and name.endswith(_TEMPORARY):
                os.unlink(os.path.join(parent, name))
                removed += 1
    return removed


def first_written(folder: str, since: float, suffix: str = "") -> float | None:
    """Seconds from `since` (epoch) to the first file named *suffix written under `folder` since then;
    None when there is none. Files of earlier attempts are older and left out; an object store's
    second-resolution times get a second's grace."""
    fs, p = resolve(folder)
    if fs.get_file_info(p).type != pafs.FileType.Directory:
        return None
    times = [
        info.mtime.timestamp()
        for info in fs.get_file_info(pafs.FileSelector(p, recursive=True))
        if info.type == pafs.FileType.File and info.path.endswith(suffix) and info.mtime is not None
    ]
    recent = [t for t in times if t >= since - 1.0]
    return max(0.0, min(recent) - since) if recent else None


def is_complete(stage_dir: str) -> bool:
    """The marker exists (`read_summary` tells whether it and the files it lists are intact)."""
    return exists(join(stage_dir, SUCCESS))


def mark_complete(stage_dir: str, summary: dict) -> None:
    """Write the completion marker last: the summary and the files (names, sizes) it covers."""
    marker = {**summary, FILES: list_files(stage_dir)}
    write_text(join(stage_dir, SUCCESS), json.dumps(marker, indent=2, sort_keys=True))


def damaged_marker(stage_dir: str, what: str) -> StateError:
    return StateError(
        f"stage dir {stage_dir}: {what}; re-run the stage with --overwrite"
        " (`artaug run --resume` re-runs it by itself)"
    )


def read_summary(stage_dir: str, check_files: bool = True) -> dict:
    """The summary a completed stage wrote, after checking that the files its marker lists are there
    with the recorded sizes (markers written before the list existed are read as they are)."""
    try:
        marker = read_json_object(join(stage_dir, SUCCESS))
    except ValueError as err:
        raise damaged_marker(stage_dir, f"{SUCCESS} is damaged ({err})") from None
    listed = marker.pop(FILES, None)
    if listed is None or not check_files:
        return marker
    if not isinstance(listed, dict):
        raise damaged_marker(stage_dir, f"{SUCCESS} is damaged (its file list is not an object)")
    found = list_files(stage_dir)
    for name, size in sorted(listed.items()):
        if name not in found:
            raise damaged_marker(stage_dir, f"{name} is missing (listed in {SUCCESS})")
        if found[name] != size:
            raise damaged_marker(stage_dir, f"{name} has {found[name]} bytes, {SUCCESS} recorded {size}")
    return marker
