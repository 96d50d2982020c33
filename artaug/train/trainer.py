"""Fit a LoRA on a latent cache: Ray Train's TorchTrainer with DeepSpeed inside each worker.

Writes into a training output folder (`artaug.layout.TrainOutput`): OUT/checkpoints/ is Ray Train's
storage (<run name>/step-NNNNNN/ checkpoints and Ray's run state); OUT/lora/ receives the kept LoRA
(LoRA-2, what diffusers loads) and metrics.jsonl (loss and seconds per step).

A run stopped part-way (killed, failed, cluster lost) and submitted again with the same OUT and run
name resumes from its latest complete checkpoint (`artaug.train.checkpoints`: an incomplete one is
named and passed over). A worker that dies is replaced and the group resumes from the latest complete
checkpoint (`train.max_failures`). A non-finite loss or LoRA weight stops the run with
`TrainingDivergedError` (no LoRA written, no marker), naming the round, phase and step.
"""

from __future__ import annotations

import json
import logging
import os
import time

from ray.train import CheckpointConfig, FailureConfig, ScalingConfig
from ray.train import RunConfig as RayRunConfig
from ray.train.torch import TorchTrainer

from artaug import storage
from artaug.cluster import gpus_for, init_ray, label_selector
from artaug.config import RunConfig
from artaug.errors import ArtaugError
from artaug.layout import WEIGHT_NAME, TrainOutput
from artaug.lora.algebra import combine
from artaug.lora.files import check_finite_bytes, read_metadata
from artaug.train.backend import WorkerDeviceTorchConfig
from artaug.train.checkpoints import DIVERGED, claim, config_hash, prepare
from artaug.train.latents import ID_COLUMNS, read_cache
from artaug.train.pairs import PairsError
from artaug.train.per_pair import fit_per_pair
from artaug.train.worker import METRICS_FILE, STATE_FILE, FaultInjection, train_loop_per_worker

log = logging.getLogger(__name__)

# Ray Train settings for a private local Ray (a laptop, CI). Each fit starts a preemption-watcher actor
# (one more Python process, ~4 s of CPU on a 2-core machine) to watch for a node being drained, which a
# single private node never is, and exports metrics nobody scrapes; its controller polls the workers
# every 2 s, so a finished fit waits up to 2 s to be noticed. Ray Train passes these variables from
# the driver to its controller and workers; a value the user set is kept. Measured in
# benchmarks/train_fit_start.py.
LOCAL_TRAIN_ENV = {
    "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0",
    "RAY_TRAIN_METRICS_ENABLED": "0",
    "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.5",
}


class TrainingDivergedError(ArtaugError, RuntimeError):
    """The loss or a LoRA weight became NaN or inf; the message names the step and what to change."""


def fit(
    cfg: RunConfig,
    cache_dir: str,
    out: str,
    round_index: int | None = None,
    faults: list[FaultInjection] = (),
) -> dict:
    """Run (or resume) the TorchTrainer on a complete latent cache; write OUT/lora; return the summary."""
    if cfg.train.mode == "pairwise-average":
        return fit_subsets(cfg, cache_dir, out, round_index)
    if cfg.train.mode == "per-pair":
        return fit_per_pair(cfg, cache_dir, out, round_index)
    return _fit_one(cfg, cache_dir, out, round_index, faults)


def fit_subsets(cfg: RunConfig, cache_dir: str, out: str, round_index: int | None = None) -> dict:
    """pairwise-average: one differential run (own LoRA-1, own LoRA-2) per disjoint subset of the pairs
    (cache rows k::K, in OUT/subsets/k/), then OUT/lora holds the mean of their LoRA-2 weight changes:
    the factors concatenated with scale 1/K each, which is exact (averaging the factors would not be).

    A subset whose run is complete is not trained again, so a stopped run resumes where it was.
    """
    count = cfg.train.subsets
    ids = read_cache(cache_dir).select(ID_COLUMNS).to_pylist()
    if len(ids) < count:
        raise PairsError(
            f"train.subsets={count} needs at least {count} usable pairs, the cache has {len(ids)}"
        )
    runs = []
    target = TrainOutput(out)
    for k in range(count):
        sub = target.subset(k)
        if storage.is_complete(sub.root):
            runs.append(storage.read_summary(sub.root))
            continue
        runs.append(_fit_one(cfg, cache_dir, sub.root, round_index, subset=(k, count)))
        runs[-1]["pairs"] = [row["prompt_id"] for row in ids[k::count]]
        storage.mark_complete(sub.root, runs[-1])
    storage.remove_tree(target.lora_dir)
    lora = target.lora
    first = read_metadata(runs[0]["lora"])
    averaged = combine(
        [r["lora"] for r in runs],
        lora,
        scales=[1 / count] * count,
        metadata={**first, "lora": f"LoRA-2 (kept): mean of {count} subset LoRA-2s", "subsets": count},
    )
    lines = [
        json.dumps({**json.loads(line), "subset": k})
        for k, r in enumerate(runs)
        for line in storage.read_bytes(target.subset(k).metrics).decode().splitlines()
    ]
    storage.write_text(target.metrics, "".join(line + "\n" for line in lines))
    busy, seconds = sum(r.get("busy_s", 0.0) for r in runs), sum(r["seconds"] for r in runs)
    return {
        "mode": cfg.train.mode,
        "steps": sum(r["steps"] for r in runs),
        "first_loss": sum(r["first_loss"] for r in runs) / count,
        "final_loss": sum(r["final_loss"] for r in runs) / count,
        "restarts": [x for r in runs for x in r["restarts"]],
        "seconds": round(seconds, 3),
        "busy_s": round(busy, 3),
        "busy_fraction": round(busy / seconds, 4) if seconds else None,
        "lora": lora,
        "rank": averaged["rank"],
        "subsets": runs,
        "config_hash": runs[0]["config_hash"],
        "cache": runs[0]["cache"],
    }


def _fit_one(
    cfg: RunConfig,
    cache_dir: str,
    out: str,
    round_index: int | None = None,
    faults: list[FaultInjection] = (),
    subset: tuple[int, int] | None = None,
) -> dict:
    cache = storage.read_summary(cache_dir)
    round_index = round_index if round_index is not None else max(cache.get("rounds") or [1])
    digest = config_hash(cfg, cache)
    target = TrainOutput(out)
    checkpoints = target.checkpoints
    claim(checkpoints, digest)
    experiment = storage.join(checkpoints, cfg.name)  # Ray Train's folder of this run's checkpoints
    prepare(experiment)
    init_ray(cfg.ray, output=out)
    if cfg.ray.address == "local":
        for name, value in LOCAL_TRAIN_ENV.items():
            os.environ.setdefault(name, value)
    gpus = gpus_for(cfg.train.resources)
    fs, path = storage.resolve(checkpoints)
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={
            "cfg": cfg,
            "cache_dir": cache_dir,
            "experiment": experiment,
            "config_hash": digest,
            "round_index": round_index,
            "faults": list(faults),
            "subset": subset,
        },
        scaling_config=ScalingConfig(
            num_workers=cfg.train.num_workers,
            use_gpu=gpus > 0,
            resources_per_worker={"CPU": cfg.train.resources.cpus, **({"GPU": gpus} if gpus > 0 else {})},
            label_selector=label_selector(cfg.train.resources.node_labels),
        ),
        # The workers choose: NCCL where all see CUDA, gloo elsewhere (CPU, or logical GPUs without CUDA)
        torch_config=WorkerDeviceTorchConfig(),
        run_config=RayRunConfig(
            name=cfg.name,
            storage_path=path,
            storage_filesystem=fs if storage.is_uri(checkpoints) else None,
            failure_config=FailureConfig(max_failures=cfg.train.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=cfg.train.keep_checkpoints),
        ),
    )
    start, started_at = time.perf_counter(), time.time()
    result = trainer.fit()
    seconds = time.perf_counter() - start
    if storage.exists(storage.join(experiment, DIVERGED)):
        raise _diverged(
            cfg, round_index, json.loads(storage.read_bytes(storage.join(experiment, DIVERGED))), subset
        )
    final = result.checkpoint
    state = json.loads(_read(final, STATE_FILE))
    check_finite_bytes(_read(final, WEIGHT_NAME), f"{final.path}/{WEIGHT_NAME}")
    storage.remove_tree(target.lora_dir)
    for name in (WEIGHT_NAME, METRICS_FILE):
        storage.write_bytes(storage.join(target.lora_dir, name), _read(final, name))
    history = state["history"]
    # Busy: this fit's steps (a resumed fit's history also holds the steps of earlier attempts); the
    # rest of the fit's wall time is the worker group's start, DeepSpeed's set-up and checkpoints.
    busy = sum(entry["seconds"] for entry in history if entry.get("time", started_at) >= started_at)
    return {
        "mode": cfg.train.mode,
        "steps": state["step"],
        "first_loss": history[0]["loss"],
        "final_loss": history[-1]["loss"],
        "restarts": state["restarts"],
        "rank_digests": state["rank_digests"],
        "seconds": round(seconds, 3),
        "busy_s": round(busy, 3),
        "busy_fraction": round(busy / seconds, 4) if seconds else None,
        "lora": target.lora,
        "checkpoint": final.path,
        "config_hash": digest,
        "cache": cache,
    }


def _diverged(cfg: RunConfig, round_index: int, d: dict, subset) -> TrainingDivergedError:
    bad = d["bad_tensors"]
    what = f"loss {d['loss']}" + (f", {bad} LoRA tensor(s) NaN or inf" if bad else "")
    where = f"round {round_index}" + (f" subset {subset[0]}" if subset else "")
    lr = cfg.train.learning_rate
    return TrainingDivergedError(
        f"training diverged in {where}, phase {d['phase']} ({d['images']} images), step {d['step']}:"
        f" {what}; no LoRA was saved. Lower train.learning_rate (now {lr:g}) and resume:"
        f" `artaug run --resume RUN_DIR --set train.learning_rate={lr / 10:g}`"
        f" (`artaug train` needs --overwrite with the new --set)"
    )


def _read(checkpoint, name: str) -> bytes:
    with checkpoint.filesystem.open_input_stream(f"{checkpoint.path}/{name}") as f:
        return f.read()
