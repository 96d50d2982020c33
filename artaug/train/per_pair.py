"""`train.mode: per-pair`, the authors' own Differential LoRA recipe, as thousands of short fits.

For each pair, LoRA-1 is fitted to its before image alone (it overfits), then LoRA-2 to its after
image on the model + that LoRA-1 (kept as a frozen adapter stacked under LoRA-2, which is the same
model as LoRA-1 fused). The pairs' LoRA-2 deltas are then averaged per layer in fp32
(`artaug.lora.algebra.mean`: exact while the concatenation stays within `train.pair_exact_rank`, else
compressed by SVD to `train.rank` with the error reported).

Embarrassingly parallel: Ray Data streams the latent cache's rows to `train.num_workers` fit actors
(`PairFitter`). Each loads the transformer once and fits pairs one after another, resetting only the
two adapters and the optimizer; `train.fits_per_gpu` of them share a GPU. A finished pair's LoRA-2
is written to OUT/pairs/ at once (atomically), so a stopped run started again skips it. A fit that
raises (a non-finite loss, a bad row) is tried `train.pair_retries` more times, then reported while
the other pairs go on; an actor that dies is restarted and its pair given to it again.
"""

from __future__ import annotations

import json
import logging
import math
import time
import warnings
import zlib

import pyarrow as pa
import pyarrow.parquet as pq
import ray
import torch

from artaug import storage
from artaug.cluster import gpus_for, init_ray, label_selector
from artaug.config import RunConfig
from artaug.layout import TrainOutput
from artaug.lora.algebra import mean
from artaug.lora.files import save_lora
from artaug.models.flow_matching import flow_matching_loss
from artaug.models.synthesis import load_transformer
from artaug.train.checkpoints import claim, config_hash
from artaug.train.data import mix_seed
from artaug.train.latents import from_bytes
from artaug.train.pairs import PairsError

log = logging.getLogger(__name__)

SIDES = ("before", "after")  # the adapters' names: LoRA-1 fits the before image, LoRA-2 the after
RESULT = pa.schema(
    [("pair", pa.string()), ("status", pa.string()), ("attempts", pa.int32()), ("seconds", pa.float64()),
     ("losses", pa.string()), ("error", pa.string())]
)  # fmt: skip


def pair_name(row: dict) -> str:
    """The file stem of a pair's LoRA-2 in OUT/pairs/ (prompt ids are path-safe: artaug.prompts)."""
    return f"{row['prompt_id']}-s{row['seed']}-r{row['round']}"


class PairFitter:
    """Fit actor: the transformer loaded once with two adapters; fits one pair after another."""

    def __init__(self, cfg: RunConfig, pairs_dir: str, digest: str, round_index: int):
        from peft import LoraConfig
        from peft.tuners.lora import LoraLayer

        self.cfg, self.t, self.pairs_dir = cfg, cfg.train, pairs_dir
        self.digest, self.round_index = digest, round_index
        torch.set_num_threads(self.t.resources.torch_threads)
        cuda = torch.cuda.is_available() and gpus_for(self.t.resources) > 0
        self.device = torch.device("cuda" if cuda else "cpu")
        bf16 = self.t.precision == "bfloat16" or (self.t.precision == "auto" and cuda)
        self.dtype = torch.bfloat16 if bf16 else torch.float32
        self.transformer = load_transformer(cfg.model, self.device, self.dtype).requires_grad_(False)
        if self.t.gradient_checkpointing:
            self.transformer.enable_gradient_checkpointing()
        self.guidance = self.t.guidance if self.transformer.config.guidance_embeds else None
        self.lora_config = LoraConfig(
            r=self.t.rank, lora_alpha=self.t.alpha, target_modules=list(self.t.target_modules)
        )
        with warnings.catch_warnings():  # peft warns that a second adapter is added: it is meant to be
            warnings.filterwarnings("ignore", message="Already found a `peft_config`")
            for side in SIDES:
                self.transformer.add_adapter(self.lora_config, adapter_name=side)
        self.layers = [m for m in self.transformer.modules() if isinstance(m, LoraLayer)]
        for p in self._params(SIDES):  # fp32 adapters under a bf16 model, as DeepSpeed's master weights
            p.data = p.data.float()

    def __call__(self, batch: pa.Table) -> pa.Table:
        rows = [self._one(row) for row in batch.to_pylist() if not row["skipped"]]
        return pa.Table.from_pylist(rows, schema=RESULT)

    def _one(self, row: dict) -> dict:
        name = pair_name(row)
        path = storage.join(self.pairs_dir, f"{name}.safetensors")
        if storage.exists(path):  # finished before a stop: not fitted again
            return {"pair": name, "status": "reused", "attempts": 0, "seconds": 0.0}
        error = None
        for attempt in range(1, self.t.pair_retries + 2):
            start = time.perf_counter()
            try:
                losses = self._fit(row)
            except Exception as err:  # noqa: BLE001 - one pair's failure must not stop the others
                error = f"{type(err).__name__}: {err}"
                log.warning("pair %s, attempt %d failed: %s", name, attempt, error)
                continue
            weights = self._weights("after")
            meta = self._metadata(name, losses)
            save_lora(path, weights, self.lora_config, meta)
            seconds = time.perf_counter() - start
            return {"pair": name, "status": "fitted", "attempts": attempt, "seconds": seconds,
                    "losses": json.dumps(losses)}  # fmt: skip
        return {"pair": name, "status": "failed", "attempts": self.t.pair_retries + 1, "error": error}

    def _fit(self, row: dict) -> dict[str, list[float]]:
        shape, dtype = row["latent_shape"], row["dtype"]
        latents = {side: from_bytes(row[f"{side}_latent"], dtype, shape)[None] for side in SIDES}
        embeds = from_bytes(row["prompt_embeds"], dtype, row["text_shape"])[None]
        pooled = from_bytes(row["pooled_embeds"], dtype, [-1])[None]
        seed = mix_seed(self.t.seed, zlib.crc32(row["prompt_id"].encode()), row["seed"], row["round"])
        torch.manual_seed(seed)  # the adapters' init: a function of the pair, whichever actor fits it
        for layer in self.layers:
            for side in SIDES:
                layer.reset_lora_parameters(side, init_lora_weights=True)
        losses = {}
        for phase, (side, steps) in enumerate(self.t.phase_steps):
            active = list(SIDES[: phase + 1])  # LoRA-2 trains on top of the frozen LoRA-1
            for layer in self.layers:
                layer.set_adapter(active)
            params = self._params([side])
            for p in self._params([s for s in SIDES if s != side]):
                p.requires_grad_(False)
            losses[side] = self._steps(params, latents[side], embeds, pooled, steps, mix_seed(seed, phase))
        return losses

    def _steps(self, params, latents, embeds, pooled, steps: int, seed: int) -> list[float]:
        optimizer = torch.optim.AdamW(params, lr=self.t.learning_rate, weight_decay=self.t.weight_decay)
        generator, batch, out = torch.Generator().manual_seed(seed), self.t.micro_batch_size, []
        for step in range(1, steps + 1):
            loss = flow_matching_loss(
                self.transformer,
                latents.repeat(batch, 1, 1, 1).to(self.device, self.dtype),
                embeds.repeat(batch, 1, 1).to(self.device, self.dtype),
                pooled.repeat(batch, 1).to(self.device, self.dtype),
                generator,
                self.guidance,
            )
            if not math.isfinite(loss.item()):
                raise FloatingPointError(f"loss {loss.item()} at step {step}: lower train.learning_rate")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if self.t.max_grad_norm > 0:
                torch.nn.utils.clip_grad_norm_(params, self.t.max_grad_norm)
            optimizer.step()
            out.append(round(loss.item(), 6))
        return out

    def _params(self, sides) -> list[torch.nn.Parameter]:
        return [p for layer in self.layers for side in sides
                for p in (layer.lora_A[side].weight, layer.lora_B[side].weight)]  # fmt: skip

    def _weights(self, side: str) -> dict[str, torch.Tensor]:
        from peft.utils import get_peft_model_state_dict

        return get_peft_model_state_dict(self.transformer, adapter_name=side)

    def _metadata(self, name: str, losses: dict) -> dict:
        return {
            "base_model": base_model_label(self.cfg),
            "base_loras": list(self.cfg.model.loras),
            "round": self.round_index,
            "rank": self.t.rank,
            "alpha": self.t.alpha,
            "mode": "per-pair",
            "lora": f"LoRA-2 of pair {name}",
            "steps": {side: len(v) for side, v in losses.items()},
            "config_hash": self.digest,
        }


def base_model_label(cfg: RunConfig) -> str:
    source = cfg.model.source
    return source if source != "tiny" else f"tiny(seed={cfg.model.tiny_seed})"


def fit_per_pair(cfg: RunConfig, cache_dir: str, out: str, round_index: int | None = None) -> dict:
    """Fit every usable pair of the latent cache (skipping those OUT/pairs already holds), then write
    the mean of their LoRA-2 deltas to OUT/lora; returns the summary."""
    cache = storage.read_summary(cache_dir)
    round_index = round_index if round_index is not None else max(cache.get("rounds") or [1])
    digest, target = config_hash(cfg, cache), TrainOutput(out)
    claim(target.pairs, digest)  # pairs fitted under another configuration are never averaged in
    init_ray(cfg.ray, output=out)
    fs, path = storage.resolve(cache_dir)
    usable = pq.ParquetDataset(path, filesystem=fs).read(["skipped"]).column("skipped").null_count
    gpus, t = gpus_for(cfg.train.resources), cfg.train
    blocks = max(1, min(usable, 64 * t.num_workers))  # small blocks: every actor gets pairs at once
    rows = ray.data.read_parquet(path, filesystem=fs, file_extensions=["parquet"], override_num_blocks=blocks)
    fitted = rows.map_batches(
        PairFitter,
        fn_constructor_kwargs={
            "cfg": cfg,
            "pairs_dir": target.pairs,
            "digest": digest,
            "round_index": round_index,
        },  # fmt: skip
        batch_size=1,
        batch_format="pyarrow",
        compute=ray.data.ActorPoolStrategy(size=t.num_workers),
        num_cpus=t.resources.cpus,
        num_gpus=gpus / t.fits_per_gpu if gpus else None,
        max_restarts=t.pair_retries,
        max_task_retries=t.pair_retries,
        **({"label_selector": label_selector(t.resources.node_labels)} if t.resources.node_labels else {}),
    )
    start, results = time.perf_counter(), []
    for row in fitted.iter_rows():
        results.append(row)
        _progress(results, usable, time.perf_counter() - start)
    seconds = time.perf_counter() - start
    return _average(cfg, target, results, seconds, digest, cache, round_index)


def _progress(results: list[dict], total: int, seconds: float) -> None:
    row = results[-1]
    if row["status"] == "fitted":  # (a reused pair says nothing: a resumed run names the count at the end)
        after = json.loads(row["losses"])["after"]
        log.info("pair %d/%d %s fitted in %.2f s (LoRA-2 loss %.5f -> %.5f), %.1f s so far",
                 len(results), total, row["pair"], row["seconds"], after[0], after[-1], seconds)  # fmt: skip
    elif row["status"] == "failed":
        log.warning("pair %d/%d %s failed after %d attempts: %s",
                    len(results), total, row["pair"], row["attempts"], row["error"])  # fmt: skip


def _average(cfg, target: TrainOutput, results: list[dict], seconds: float, digest: str, cache: dict,
             round_index: int) -> dict:  # fmt: skip
    failed = [r for r in results if r["status"] == "failed"]
    done = sorted(r["pair"] for r in results if r["status"] != "failed")
    if not done:
        raise PairsError(f"per-pair training: every pair failed ({failed[0]['error']})")
    files = [storage.join(target.pairs, f"{name}.safetensors") for name in done]
    storage.remove_tree(target.lora_dir)
    meta = {"base_model": base_model_label(cfg), "round": round_index, "mode": "per-pair",
            "config_hash": digest, "pairs": len(files),
            "lora": f"LoRA-2 (kept): mean of {len(files)} pairs' LoRA-2s"}  # fmt: skip
    averaged = mean(files, target.lora, cfg.train.rank, cfg.train.pair_exact_rank, metadata=meta)
    fitted = [r for r in results if r["status"] == "fitted"]
    lines = [{"pair": r["pair"], "seconds": round(r["seconds"], 4), "attempts": r["attempts"],
              **json.loads(r["losses"])} for r in fitted]  # fmt: skip
    storage.write_text(target.metrics, "".join(json.dumps(line) + "\n" for line in lines))
    busy = sum(r["seconds"] for r in fitted)
    after = [json.loads(r["losses"])["after"] for r in fitted]
    return {
        "mode": "per-pair",
        "pairs": {"fitted": len(fitted), "reused": len(done) - len(fitted), "failed": len(failed)},
        "failed_pairs": {r["pair"]: r["error"] for r in failed},
        "steps": sum(len(v) for line in lines for k, v in line.items() if k in SIDES),
        "first_loss": sum(a[0] for a in after) / len(after) if after else None,
        "final_loss": sum(a[-1] for a in after) / len(after) if after else None,
        "restarts": [],
        "seconds": round(seconds, 3),
        "busy_s": round(busy, 3),
        "busy_fraction": round(busy / (seconds * cfg.train.num_workers), 4) if seconds else None,
        "worker_seconds_per_pair": round(seconds * cfg.train.num_workers / len(results), 3),
        "lora": target.lora,
        "rank": averaged["rank"],
        "exact": averaged["exact"],
        **({"relative_error": averaged["relative_error"]} if not averaged["exact"] else {}),
        "config_hash": digest,
        "cache": cache,
    }
