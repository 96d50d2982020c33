"""The per-worker training loop that Ray Train's TorchTrainer runs on every rank.

Each worker holds the transformer and the whole latent cache. Phases run in order (differential:
LoRA-1 on the before latents, then LoRA-2 on the after latents from the model with LoRA-1 merged;
direct: LoRA-2 only; dpo: one phase on both sides of each pair; the losses: `artaug.train.objective`).
Steps are numbered globally across phases. Everything random (LoRA init, sample order, noise,
timesteps) is a function of (seed, phase, step, micro-batch, rank), so a run resumed from a
checkpoint takes exactly the steps an uninterrupted run takes.

A checkpoint is one folder in Ray Train's storage: `state.json` (step, loss history, restarts),
`phase1.safetensors` once LoRA-1 is done, DeepSpeed's own files for the phase in progress (LoRA
weights and each rank's optimizer shard; the frozen base is not saved) and, written last, each
rank's marker listing its files: a run resumes from the latest complete checkpoint
(`artaug.train.checkpoints`). A non-finite loss or LoRA weight stops training at that step: every
rank returns, rank 0 writes `diverged.json` beside the checkpoints, nothing else is saved, and the
driver raises (Ray's Result carries only the latest checkpoint's metrics). The final report adds the
kept LoRA (`pytorch_lora_weights.safetensors`), `metrics.jsonl` and `probe.safetensors` (one
forward pass of the trained model, for checking that the saved file reproduces it).
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import tempfile
import time

import ray.train
import ray.train.torch
import torch
import torch.distributed as dist
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict
from safetensors.torch import save_file

from artaug import storage
from artaug.config import RunConfig
from artaug.layout import METRICS_NAME, WEIGHT_NAME
from artaug.lora.files import save_lora
from artaug.lora.fuse import fuse_into_transformer
from artaug.models.synthesis import load_transformer
from artaug.train.checkpoints import (
    DIVERGED,
    CheckpointError,
    FaultInjection,
    latest_complete,
    maybe_fault,
    write_marker,
)
from artaug.train.checks import nonfinite_weights, probe, weights_digest
from artaug.train.data import CachedPairs, mix_seed, sample_indices
from artaug.train.deepspeed_config import deepspeed_config, prepare_process
from artaug.train.objective import Objective
from artaug.train.preference import REWARDS, both_fell

DS_TAG = "deepspeed"  # DeepSpeed's sub-folder in a checkpoint
PHASE1_FILE = "phase1.safetensors"
STATE_FILE = "state.json"
METRICS_FILE = METRICS_NAME
PROBE_FILE = "probe.safetensors"

# Under Ray Train, the root logger of a worker writes to the console (forwarded to the driver) and to
# the run's log files; print() is re-routed there too, but also echoed, so lines would appear twice.
log = logging.getLogger(__name__)


class CheckpointMismatchError(RuntimeError):
    """A checkpoint was written by a run with another training configuration."""


def train_loop_per_worker(config: dict) -> None:
    """Ray Train entry point; config: cfg (RunConfig), cache_dir, experiment (the checkpoints' folder),
    config_hash, round_index, faults, subset."""
    Worker(config).run()


class Worker:
    def __init__(self, config: dict):
        self.cfg: RunConfig = config["cfg"]
        self.settings = self.cfg.train
        self.config_hash = config["config_hash"]
        self.round_index = config["round_index"]
        self.faults: list[FaultInjection] = config.get("faults") or []
        torch.set_num_threads(self.settings.resources.torch_threads)
        context = ray.train.get_context()
        self.rank, self.world = context.get_world_rank(), context.get_world_size()
        # the device from torch, not from Ray's GPU assignment (a logical GPU has no CUDA behind it)
        self.device = ray.train.torch.get_device() if torch.cuda.is_available() else torch.device("cpu")
        bf16 = self.settings.precision == "bfloat16" or (
            self.settings.precision == "auto" and self.device.type == "cuda"
        )
        self.dtype = torch.bfloat16 if bf16 else torch.float32
        prepare_process(on_cpu=self.device.type == "cpu")
        self.data = CachedPairs(config["cache_dir"], config.get("subset"))
        self.transformer = load_transformer(self.cfg.model, self.device, self.dtype).requires_grad_(False)
        if self.settings.gradient_checkpointing:
            self.transformer.enable_gradient_checkpointing()
        self.guidance = self.settings.guidance if self.transformer.config.guidance_embeds else None
        self.objective = Objective(self.data, self.settings.dpo_beta, self.device, self.dtype, self.guidance)
        self.step, self.history, self.restarts, self.evals = 0, [], [], []
        self.resume_dir: str | None = None
        self.phase1_file: str | None = None
        self.diverged: dict | None = None
        self.experiment = config["experiment"]
        self._scratch = tempfile.mkdtemp(prefix="artaug-train-")
        checkpoint, _ = latest_complete(config["experiment"])  # never Ray's latest if it is partial
        if checkpoint is None and ray.train.get_checkpoint() is not None:
            raise CheckpointError(f"{ray.train.get_checkpoint().path} is incomplete and no earlier one is")
        if checkpoint is not None:
            self._restore(checkpoint)

    # ------------------------------------------------------------------ phases

    def run(self) -> None:
        phases = self.settings.phase_steps
        self.total = sum(steps for _, steps in phases)
        end = 0
        for index, (images, steps) in enumerate(phases):
            start, end = end, end + steps
            kept = index == len(phases) - 1
            if self.step >= end:  # finished before a restart: LoRA-1 comes back from the checkpoint
                if not kept:
                    fuse_into_transformer(self.transformer, self.phase1_file)
                continue
            engine = self._start_phase(index)
            if self.step > start:
                loaded, _ = engine.load_checkpoint(self.resume_dir, tag=DS_TAG, load_module_strict=False)
                if loaded is None:  # DeepSpeed only warns, and would train on from fresh weights
                    raise CheckpointError(f"{self.resume_dir}: DeepSpeed found no {DS_TAG} checkpoint")
            else:
                self._evaluate(images)
            for step in range(self.step + 1, end + 1):
                self._train_step(engine, index, images, step)
                if self.diverged:  # every rank saw the same reduced values: all stop here
                    if self.rank == 0:
                        _write_text(storage.join(self.experiment, DIVERGED), json.dumps(self.diverged))
                    shutil.rmtree(self._scratch, ignore_errors=True)
                    return
                if step == end:
                    self._evaluate(images)
                if step == end and kept:
                    self._finish(engine, index)
                elif step == end:
                    self._end_phase1(engine, index)
                elif step % self.settings.checkpoint_every == 0:
                    self._checkpoint(engine)
                maybe_fault(self.faults, self.rank, step)
        shutil.rmtree(self._scratch, ignore_errors=True)

    def _start_phase(self, index: int):
        import deepspeed  # after prepare_process, which points DeepSpeed's op builds at a stable cache

        self.lora_config = LoraConfig(
            r=self.settings.rank,
            lora_alpha=self.settings.alpha,
            target_modules=list(self.settings.target_modules),
            init_lora_weights=True,  # A random, B zero: the phase starts from the model as it is
        )
        torch.manual_seed(mix_seed(self.settings.seed, index, 0xADA))  # the same LoRA init on every rank
        self.transformer.add_adapter(self.lora_config, adapter_name=self._adapter(index))
        self.transformer.to(self.device)
        params = [p for p in self.transformer.parameters() if p.requires_grad]
        engine, *_ = deepspeed.initialize(
            model=self.transformer,
            model_parameters=params,
            config=deepspeed_config(self.settings, bf16=self.dtype == torch.bfloat16),
            dist_init_required=False,
        )
        return engine

    def _train_step(self, engine, phase: int, images: str, step: int) -> None:
        started = time.perf_counter()
        losses, rewards = [], []
        for micro in range(self.settings.grad_accumulation):
            indices = sample_indices(
                len(self.data), self.settings.seed, phase, step, micro, self.rank, self.settings
            )
            generator = torch.Generator().manual_seed(
                mix_seed(self.settings.seed, phase, step, micro, self.rank)
            )
            loss, reward = self.objective(engine, images, indices, generator)
            engine.backward(loss)
            engine.step()
            losses.append(loss.detach().float().cpu())
            rewards.append(reward)
        reduced = torch.cat([torch.stack([torch.stack(losses).mean(), nonfinite_weights(self.transformer)]),
                             torch.stack(rewards).mean(0)]).to(self.device)  # fmt: skip
        dist.all_reduce(reduced)
        loss, bad_weights = reduced[0].item() / self.world, int(reduced[1].item())
        mean_rewards = dict(zip(REWARDS, (r / self.world for r in reduced[2:].tolist()), strict=False))
        if not math.isfinite(loss) or bad_weights:
            self.diverged = {"step": step, "phase": phase + 1, "images": images, "loss": loss,
                             "bad_tensors": bad_weights}  # fmt: skip
        entry = {
            "step": step,
            "phase": images,
            "loss": loss,
            **mean_rewards,  # dpo: the implicit rewards (artaug.train.preference)
            "seconds": round(time.perf_counter() - started, 4),
            "samples": self.world * self.settings.micro_batch_size * self.settings.grad_accumulation,
            "time": round(time.time(), 3),  # wall clock when the step ended
        }
        self.history.append(entry)
        self.step = step
        if self.rank == 0:
            shown = "".join(f" {key} {value:.5g}" for key, value in mean_rewards.items())
            log.info("step %d/%d (%s) loss %.5f%s %.3f s/step", step, self.total, images, loss, shown,
                     entry["seconds"])  # fmt: skip

    @torch.no_grad()
    def _evaluate(self, images: str, samples: int = 4) -> None:
        """Rank 0: loss on the first cached pairs with fixed noise and timesteps, comparable across steps."""
        if self.rank != 0:
            return
        losses, rewards = [], []
        for i in range(min(samples, len(self.data))):
            generator = torch.Generator().manual_seed(mix_seed(self.settings.seed, 0xE7A1, i))
            loss, reward = self.objective(self.transformer, images, [i], generator)
            losses.append(loss.item())
            rewards.append(reward)
        mean_rewards = zip(REWARDS, torch.stack(rewards).mean(0).tolist(), strict=False)  # dpo only
        self.evals.append(
            {"step": self.step, "phase": images, "loss": sum(losses) / len(losses), **dict(mean_rewards)}
        )
        log.info("step %d: fixed-noise loss on %s %.5f", self.step, images, self.evals[-1]["loss"])

    def _end_phase1(self, engine, index: int) -> None:
        """Save LoRA-1, merge it into the base from that file (as a resumed run does), checkpoint."""
        weights = get_peft_model_state_dict(self.transformer, adapter_name=self._adapter(index))
        self.phase1_file = os.path.join(self._scratch, PHASE1_FILE)
        save_lora(self.phase1_file, weights, self.lora_config, self._metadata("phase1"))
        engine.destroy()
        self.transformer.unload_lora()
        fuse_into_transformer(self.transformer, self.phase1_file)
        self._checkpoint(None)

    def _finish(self, engine, index: int) -> None:
        """Check the ranks agree; report the kept LoRA, the metrics and a probe as the last checkpoint."""
        weights = get_peft_model_state_dict(self.transformer, adapter_name=self._adapter(index))
        digest = weights_digest(weights)
        digests = [None] * self.world
        dist.all_gather_object(digests, digest)
        if len(set(digests)) > 1:
            raise RuntimeError(f"ranks hold different LoRA weights after training: {digests}")
        files = {}
        if self.rank == 0 and (warning := both_fell(self.history)):
            log.warning(warning)
        if self.rank == 0:
            files[WEIGHT_NAME] = lambda path: save_lora(
                path, weights, self.lora_config, self._metadata("final")
            )
            files[PROBE_FILE] = lambda path: save_file(
                probe(self.transformer, self.data, self.settings.seed, self.guidance), path
            )
            files[METRICS_FILE] = lambda path: _write_lines(path, self.history)
        self._checkpoint(None, files, extra_state={"rank_digests": digests, "final": True})
        engine.destroy()

    # ------------------------------------------------------------------ checkpoints

    def _checkpoint(self, engine, files: dict | None = None, extra_state: dict | None = None) -> None:
        """Report a checkpoint of this step: every rank's DeepSpeed files, rank 0's state and files."""
        with tempfile.TemporaryDirectory() as folder:
            if engine is not None:
                engine.save_checkpoint(folder, tag=DS_TAG, exclude_frozen_parameters=True)
            if self.rank == 0:
                state = {
                    "step": self.step,
                    "config_hash": self.config_hash,
                    "history": self.history,
                    "restarts": self.restarts,
                    "evals": self.evals,
                    **(extra_state or {}),
                }
                _write_text(os.path.join(folder, STATE_FILE), json.dumps(state, indent=1))
                if self.phase1_file:
                    shutil.copy(self.phase1_file, os.path.join(folder, PHASE1_FILE))
                for name, write in (files or {}).items():
                    write(os.path.join(folder, name))
            write_marker(folder, self.rank, self.world, self.step)
            ray.train.report(
                {"step": self.step, "loss": self.history[-1]["loss"] if self.history else None},
                checkpoint=ray.train.Checkpoint.from_directory(folder),
                checkpoint_dir_name=f"step-{self.step:06d}" + ("-final" if extra_state else ""),
            )

    def _restore(self, path: str) -> None:
        fs, inner = storage.resolve(path)
        checkpoint = ray.train.Checkpoint(inner, filesystem=fs)
        folder = checkpoint.to_directory(os.path.join(self._scratch, "resume"))
        with open(os.path.join(folder, STATE_FILE)) as f:
            state = json.load(f)
        if state["config_hash"] != self.config_hash:
            raise CheckpointMismatchError(
                f"checkpoint {checkpoint.path} was written with training config {state['config_hash']},"
                f" this run has {self.config_hash}"
            )
        self.step, self.history, self.evals = state["step"], state["history"], state["evals"]
        self.restarts = state["restarts"] + [{"from_step": self.step}]
        self.resume_dir = folder
        if os.path.exists(os.path.join(folder, PHASE1_FILE)):
            self.phase1_file = os.path.join(folder, PHASE1_FILE)
        if self.rank == 0:
            log.info("resuming from step %d (%s)", self.step, path)

    # ------------------------------------------------------------------ helpers

    @staticmethod
    def _adapter(index: int) -> str:
        return f"phase{index + 1}"

    def _metadata(self, which: str) -> dict:
        return {
            "base_model": self.cfg.model.source
            if self.cfg.model.source != "tiny"
            else f"tiny(seed={self.cfg.model.tiny_seed})",
            "base_loras": list(self.cfg.model.loras),
            "round": self.round_index,
            "rank": self.settings.rank,
            "alpha": self.settings.alpha,
            "mode": self.settings.mode,
            **({"dpo_beta": self.settings.dpo_beta} if self.settings.mode == "dpo" else {}),
            "lora": "LoRA-1 (before images, discarded)" if which == "phase1" else "LoRA-2 (kept)",
            "steps": self.step,
            "config_hash": self.config_hash,
        }


def _write_text(path: str, text: str) -> None:
    storage.write_text(path, text)


def _write_lines(path: str, records: list[dict]) -> None:
    _write_text(path, "".join(json.dumps(r) + "\n" for r in records))
