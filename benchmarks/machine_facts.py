"""What a benchmark's figures were measured on: CPU, cores, memory, GPU, versions, and the commit
(with whether artaug/ had uncommitted changes). Imported by the scripts beside it."""

from __future__ import annotations

import os
import platform
import subprocess
from importlib.metadata import version

import psutil
import torch


def machine(packages: tuple[str, ...]) -> dict:
    with open("/proc/cpuinfo") as f:
        cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "")
    git = ["git", "-C", os.path.dirname(os.path.dirname(os.path.abspath(__file__)))]
    commit = subprocess.run([*git, "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout
    dirty = subprocess.run([*git, "status", "--porcelain", "--", "artaug"], capture_output=True, text=True)
    return {
        "arch": platform.machine(),
        "cpu": cpu,
        "cores": os.cpu_count(),
        "memory_gib": round(psutil.virtual_memory().total / 2**30, 1),
        "gpu": torch.cuda.is_available(),
        "python": platform.python_version(),
        "versions": {name: version(name) for name in packages},
        "commit": commit.strip(),
        "artaug_uncommitted_changes": bool(dirty.stdout.strip()),
    }
