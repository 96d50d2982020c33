"""A run directory opened for `artaug run`: a new one started, or an unfinished one reopened.

Light on purpose (no torch, Ray or stages): `artaug run` refuses a directory that already holds a
run, a finished one, one another process works on or one whose run.yaml changed in about a second,
before the loop (`loop.runner`) and its imports are loaded.
"""

from __future__ import annotations

import os

from artaug import storage
from artaug.config import ConfigError, RunConfig, load_config, to_yaml
from artaug.layout import RunLayout
from artaug.loop import resume
from artaug.loop.manifest import Manifest, RunDirError, config_hash


def start(cfg: RunConfig, run_dir: str) -> Manifest:
    """A new run directory: refuses one that already holds a run (nothing there is overwritten)."""
    layout = RunLayout(run_dir)
    for path in (layout.manifest, layout.run_yaml):
        if storage.exists(path):
            raise RunDirError(
                f"{run_dir} already holds a run ({os.path.basename(path)}): continue it with"
                f" `artaug run --resume {run_dir}`, or choose another --out"
            )
    storage.write_text(layout.run_yaml, to_yaml(cfg))
    return Manifest.create(run_dir, cfg)


def reopen(run_dir: str, overrides: list[str] = (), record: bool = False) -> tuple[RunConfig, Manifest]:
    """The config and manifest of an unfinished run written by this version of artaug; `overrides`
    may change train.* settings for stages not yet complete (`artaug.loop.resume`; kept in the
    manifest with `record`, which the caller does while holding the run's lock)."""
    layout = RunLayout(run_dir)
    manifest = Manifest.load(run_dir)
    if manifest.data["status"] in ("finished", "stopped"):
        raise RunDirError(
            f"{run_dir} has {manifest.data['status']}; nothing to resume (report: {layout.report_page})"
        )
    try:
        cfg = load_config(path=layout.run_yaml)
    except ConfigError as err:
        raise RunDirError(f"{layout.run_yaml}: {err}") from None
    busy = manifest.live_attempt()
    if busy:
        raise RunDirError(
            f"{run_dir} is being worked on by artaug process {busy} on this host: wait or stop it"
        )
    if config_hash(cfg) != manifest.data["config_hash"]:
        raise RunDirError(
            f"{layout.run_yaml} changed since the run started (config hash {config_hash(cfg)},"
            f" manifest {manifest.data['config_hash']}): restore it, or start a new run"
        )
    cfg, changes = resume.changed(layout.run_yaml, cfg, manifest, list(overrides))
    if record:
        resume.record(manifest, list(overrides), changes, attempt=len(manifest.data["attempts"]))
    return cfg, manifest
