"""What `artaug run --resume RUN_DIR --set train.FIELD=VALUE` may change, and how the change is kept.

A resumed run takes its own run.yaml. Only training settings may change (e.g. a lower
`train.learning_rate` after a diverged training), and only while some round's training is not yet
complete: completed stages keep what they were made with. The change is recorded in manifest.json
(`config_changes`: the `--set` items, the values before and after, the attempt, the rounds it
applies to) and replayed over run.yaml by every later resume, so run.yaml stays the configuration
the run started with. The unfinished trainings restart: their checkpoints belong to the old settings
(their latent caches, which do not depend on `train.*` settings, are kept).
"""

from __future__ import annotations

import time

from artaug import storage
from artaug.config import RunConfig, dotted, load_config, to_dict
from artaug.layout import RunLayout
from artaug.loop.manifest import Manifest, RunDirError

CHANGEABLE = "train."


def recorded(manifest: Manifest) -> list[str]:
    """The `--set` items of earlier resumes, in order."""
    return [item for change in manifest.data.get("config_changes", []) for item in change["set"]]


def changed(
    run_yaml: str, cfg: RunConfig, manifest: Manifest, overrides: list[str]
) -> tuple[RunConfig, dict]:
    """`cfg` (run.yaml's) with the recorded changes and `overrides` applied, and {key: [before, after]}
    of what `overrides` changes. Refuses any key outside train.*, and a change no stage would use."""
    if recorded(manifest):
        cfg = load_config(path=run_yaml, overrides=recorded(manifest))
    if not overrides:
        return cfg, {}
    new = load_config(path=run_yaml, overrides=[*recorded(manifest), *overrides])
    before, after = dotted(to_dict(cfg)), dotted(to_dict(new))
    changes = {k: [before.get(k), after.get(k)] for k in sorted(before.keys() | after.keys())
               if before.get(k) != after.get(k)}  # fmt: skip
    others = [k for k in changes if not k.startswith(CHANGEABLE)]
    if others:
        raise RunDirError(
            f"--resume --set may change only {CHANGEABLE}* settings (for stages not yet complete);"
            f" {', '.join(others)} would change what completed stages were made with: start a new run"
        )
    if changes and not unfinished_trainings(RunLayout(manifest.run_dir), cfg):
        raise RunDirError(
            f"{manifest.run_dir}: every round's training is complete;"
            f" {', '.join(changes)} would change nothing"
        )
    return new, changes


def record(manifest: Manifest, overrides: list[str], changes: dict, attempt: int) -> None:
    """Keep the change in the manifest; restart the unfinished trainings (their checkpoints go)."""
    if not changes:
        return
    layout = RunLayout(manifest.run_dir)
    rounds = unfinished_trainings(layout, None)
    for k in rounds:
        train = layout.round(k).train
        for folder in (train.checkpoints, storage.join(train.root, "subsets")):
            storage.remove_tree(folder)
    entry = {"set": list(overrides), "changes": changes, "attempt": attempt, "rounds": rounds,
             "time": time.strftime("%Y-%m-%dT%H:%M:%S%z")}  # fmt: skip
    manifest.data.setdefault("config_changes", []).append(entry)
    manifest.save()


def unfinished_trainings(layout: RunLayout, cfg: RunConfig | None) -> list[int]:
    """Rounds whose training is not complete: those begun, or (with `cfg`) any round yet to run."""
    last = cfg.loop.rounds if cfg is not None else _rounds_on_disk(layout)
    return [k for k in range(1, last + 1) if not storage.is_complete(layout.round(k).stage("train"))]


def _rounds_on_disk(layout: RunLayout) -> int:
    k = 0
    while storage.exists(layout.round(k + 1).root):
        k += 1
    return k
