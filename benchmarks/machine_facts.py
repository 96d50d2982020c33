"""What a benchmark's figures were measured on: CPU, cores, memory, GPU, versions, and the commit
(with whether artaug/ had uncommitted changes), and where its results go. Imported by the scripts
beside it."""

from __future__ import annotations

import datetime
import json
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


def save_result(folder: str, name: str, result: dict) -> str:
    """Write `result` as FOLDER/NAME (indented JSON); returns the path."""
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, name)
    with open(path, "w") as f:
        json.dump(result, f, indent=2)
    return path


def run_facts(packages: tuple[str, ...], load_before: tuple[float, ...]) -> dict:
    """The fields every result starts with: the date, the machine, the load averages before and now."""
    return {"date": datetime.date.today().isoformat(), "machine": machine(packages),
            "load_avg_before": load_before, "load_avg_after": os.getloadavg()}  # fmt: skip
