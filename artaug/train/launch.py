"""Train a LoRA from pairs: latent cache (Ray Data), then Ray Train's TorchTrainer with DeepSpeed inside.

    artaug train --pairs run/round-1/filter --out run/round-1/train

OUT/latents/       the latent cache (Parquet + _SUCCESS); reused by a resubmitted run
OUT/checkpoints/   Ray Train's storage: <run name>/step-NNNNNN/ checkpoints and Ray's run state
OUT/lora/          pytorch_lora_weights.safetensors (LoRA-2, what diffusers loads), metrics.jsonl
                   (loss and seconds per step), _SUCCESS written last with the summary

A run stopped part-way (killed, failed, cluster lost) and submitted again with the same OUT and run
name resumes from its latest checkpoint: Ray Train finds its own state under OUT/checkpoints. A
worker that dies is replaced and the group resumes from the latest checkpoint (`train.max_failures`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import time

from artaug import storage
from artaug.cluster import cluster_has_gpus, init_ray, label_selector
from artaug.config import RunConfig
from artaug.lora import WEIGHT_NAME, read_metadata
from artaug.models.synthesis import check_source
from artaug.stages.cache_latents import PairsError, cache_latents, eligible_pairs
from artaug.stages.generate import StageDoneError
from artaug.train.loop import METRICS_FILE, STATE_FILE, FaultInjection, train_loop_per_worker

log = logging.getLogger(__name__)

# Fields that change how a run is executed, not what it computes: a run may resume with other values.
_OPERATIONAL = {"checkpoint_every", "keep_checkpoints", "max_failures", "encode_actors", "encode_batch_size"}


class CheckpointConflictError(RuntimeError):
    """OUT/checkpoints holds a run made with another training configuration or other pairs."""


def config_hash(cfg: RunConfig, cache_summary: dict) -> str:
    """What the trained LoRA depends on: the model, the training settings and the cached pairs."""
    train = {k: v for k, v in dataclasses.asdict(cfg.train).items() if k not in _OPERATIONAL}
    what = {
        "model": dataclasses.asdict(cfg.model),
        "train": train,
        "pairs": [cache_summary.get("pairs_source"), cache_summary.get("usable")],
    }
    return hashlib.sha256(json.dumps(what, sort_keys=True).encode()).hexdigest()[:16]


def train(
    cfg: RunConfig,
    pairs_dir: str,
    out: str,
    overwrite: bool = False,
    round_index: int | None = None,
) -> dict:
    """The `artaug train` stage: checks, latent cache, training; returns the summary in OUT/lora/_SUCCESS.

    Input problems (a missing model, no pair to train on, a completed output) raise before any worker
    starts.
    """
    check_source(cfg.model)
    lora_dir = storage.join(out, "lora")
    if storage.is_complete(lora_dir) and not overwrite:
        raise StageDoneError(f"{lora_dir} already holds a trained LoRA (use --overwrite)")
    if overwrite:
        for part in ("lora", "latents", "checkpoints", "subsets"):
            storage.remove_tree(storage.join(out, part))
    eligible_pairs(pairs_dir)
    cache_dir = storage.join(out, "latents")
    if storage.is_complete(cache_dir) and storage.read_summary(cache_dir)["pairs_source"] == pairs_dir:
        cache = storage.read_summary(cache_dir)
        log.info("reusing the latent cache in %s", cache_dir)
    else:
        cache = cache_latents(cfg, pairs_dir, cache_dir)
    if cache["usable"] == 0:
        raise PairsError(f"no usable pairs in {pairs_dir}: {cache['pairs']} rows, skipped {cache['skipped']}")
    return fit(cfg, cache_dir, out, round_index=round_index)


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
    return _fit_one(cfg, cache_dir, out, round_index, faults)


def fit_subsets(cfg: RunConfig, cache_dir: str, out: str, round_index: int | None = None) -> dict:
    """pairwise-average: one differential run (own LoRA-1, own LoRA-2) per disjoint subset of the pairs
    (cache rows k::K, in OUT/subsets/k/), then OUT/lora holds the mean of their LoRA-2 weight changes:
    the factors concatenated with scale 1/K each, which is exact (averaging the factors would not be).

    A subset whose run is complete is not trained again, so a stopped run resumes where it was.
    """
    from artaug.lora import combine
    from artaug.stages.cache_latents import ID_COLUMNS, read_cache

    count = cfg.train.subsets
    ids = read_cache(cache_dir).select(ID_COLUMNS).to_pylist()
    if len(ids) < count:
        raise PairsError(
            f"train.subsets={count} needs at least {count} usable pairs, the cache has {len(ids)}"
        )
    runs = []
    for k in range(count):
        sub_out = storage.join(out, "subsets", str(k))
        if storage.is_complete(storage.join(sub_out, "lora")):
            runs.append(storage.read_summary(storage.join(sub_out, "lora")))
            continue
        runs.append(_fit_one(cfg, cache_dir, sub_out, round_index, subset=(k, count)))
        runs[-1]["pairs"] = [row["prompt_id"] for row in ids[k::count]]
        storage.mark_complete(storage.join(sub_out, "lora"), runs[-1])
    lora_dir = storage.join(out, "lora")
    storage.remove_tree(lora_dir)
    lora = storage.join(lora_dir, WEIGHT_NAME)
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
        for line in storage.read_bytes(storage.join(out, "subsets", str(k), "lora", METRICS_FILE))
        .decode()
        .splitlines()
    ]
    storage.write_text(storage.join(lora_dir, METRICS_FILE), "".join(line + "\n" for line in lines))
    summary = {
        "stage": "train",
        "mode": cfg.train.mode,
        "steps": sum(r["steps"] for r in runs),
        "first_loss": sum(r["first_loss"] for r in runs) / count,
        "final_loss": sum(r["final_loss"] for r in runs) / count,
        "restarts": [x for r in runs for x in r["restarts"]],
        "seconds": round(sum(r["seconds"] for r in runs), 3),
        "lora": lora,
        "rank": averaged["rank"],
        "subsets": runs,
        "config_hash": runs[0]["config_hash"],
        "cache": runs[0]["cache"],
    }
    storage.mark_complete(lora_dir, summary)
    return summary


def _fit_one(
    cfg: RunConfig,
    cache_dir: str,
    out: str,
    round_index: int | None = None,
    faults: list[FaultInjection] = (),
    subset: tuple[int, int] | None = None,
) -> dict:
    from ray.train import CheckpointConfig, FailureConfig, ScalingConfig
    from ray.train import RunConfig as RayRunConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    t = cfg.train
    cache = storage.read_summary(cache_dir)
    digest = config_hash(cfg, cache)
    checkpoints = storage.join(out, "checkpoints")
    _claim(checkpoints, digest)
    init_ray(cfg.ray, output=out)
    gpus = t.gpus_per_worker if t.gpus_per_worker >= 0 else (1.0 if cluster_has_gpus() else 0.0)
    fs, path = storage.resolve(checkpoints)
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={
            "cfg": cfg,
            "cache_dir": cache_dir,
            "config_hash": digest,
            "round_index": round_index if round_index is not None else max(cache.get("rounds") or [1]),
            "faults": list(faults),
            "subset": subset,
        },
        scaling_config=ScalingConfig(
            num_workers=t.num_workers,
            use_gpu=gpus > 0,
            resources_per_worker={"CPU": t.cpus_per_worker, **({"GPU": gpus} if gpus > 0 else {})},
            label_selector=label_selector(t.node_labels),
        ),
        torch_config=TorchConfig(backend="nccl" if gpus > 0 else "gloo"),
        run_config=RayRunConfig(
            name=cfg.name,
            storage_path=path,
            storage_filesystem=fs if storage.is_uri(checkpoints) else None,
            failure_config=FailureConfig(max_failures=t.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=t.keep_checkpoints),
        ),
    )
    start = time.perf_counter()
    result = trainer.fit()
    seconds = time.perf_counter() - start
    final = result.checkpoint
    state = json.loads(_read(final, STATE_FILE))
    lora_dir = storage.join(out, "lora")
    storage.remove_tree(lora_dir)
    for name in (WEIGHT_NAME, METRICS_FILE):
        storage.write_bytes(storage.join(lora_dir, name), _read(final, name))
    history = state["history"]
    summary = {
        "stage": "train",
        "mode": t.mode,
        "steps": state["step"],
        "first_loss": history[0]["loss"],
        "final_loss": history[-1]["loss"],
        "restarts": state["restarts"],
        "rank_digests": state["rank_digests"],
        "seconds": round(seconds, 3),
        "lora": storage.join(lora_dir, WEIGHT_NAME),
        "checkpoint": final.path,
        "config_hash": digest,
        "cache": cache,
    }
    storage.mark_complete(lora_dir, summary)
    return summary


def _claim(checkpoints: str, digest: str) -> None:
    """Record which configuration OUT/checkpoints belongs to; refuse to resume another one's run."""
    marker = storage.join(checkpoints, "_config_hash")
    if storage.exists(marker):
        found = storage.read_bytes(marker).decode().strip()
        if found != digest:
            raise CheckpointConflictError(
                f"{checkpoints} holds checkpoints of another training configuration or pair set"
                f" ({found}, this run {digest}): use --overwrite or another --out"
            )
    else:
        storage.write_text(marker, digest + "\n")


def _read(checkpoint, name: str) -> bytes:
    with checkpoint.filesystem.open_input_stream(f"{checkpoint.path}/{name}") as f:
        return f.read()
