"""One filesystem layer for local paths and cloud URIs (s3://, gs://), through pyarrow.fs.

Stage outputs are complete only when their `_SUCCESS` marker exists: it is written last, because a
rename is not atomic on object stores. Parquet readers skip files whose names start with "_".
"""

from __future__ import annotations

import json
import os
import posixpath

import pyarrow.fs as pafs

SUCCESS = "_SUCCESS"


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


def write_bytes(path: str, data: bytes) -> None:
    fs, p = resolve(path)
    fs.create_dir(posixpath.dirname(p) if is_uri(path) else os.path.dirname(p), recursive=True)
    with fs.open_output_stream(p) as f:
        f.write(data)


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


def is_complete(stage_dir: str) -> bool:
    return exists(join(stage_dir, SUCCESS))


def mark_complete(stage_dir: str, summary: dict) -> None:
    """Write the completion marker (with the stage's summary) last."""
    write_text(join(stage_dir, SUCCESS), json.dumps(summary, indent=2, sort_keys=True))


def read_summary(stage_dir: str) -> dict:
    return json.loads(read_bytes(join(stage_dir, SUCCESS)))
