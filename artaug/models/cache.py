"""Folders of tiny models built once under a cache directory and reused by every process."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable


def build_once(cache_dir: str, name: str, build: Callable[[str], object], marker: str = "config.json") -> str:
    """`cache_dir/name`, built on first use by `build(folder)`: into a scratch folder, then renamed,
    so a reader never sees a half-written model and concurrent builders cannot clash. A folder with
    the file `marker` counts as built."""
    root = os.path.expanduser(cache_dir)
    folder = os.path.join(root, name)
    if os.path.isfile(os.path.join(folder, marker)):
        return folder
    os.makedirs(root, exist_ok=True)
    scratch = tempfile.mkdtemp(dir=root, prefix=".building-")
    try:
        build(scratch)
        os.replace(scratch, folder)
    except OSError:
        if not os.path.isfile(os.path.join(folder, marker)):  # not a lost race: a real failure
            raise
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return folder
