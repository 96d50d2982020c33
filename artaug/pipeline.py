"""`artaug run`: the ArtAug loop over rounds, resumable from its run directory.

Round k: generate -> critique -> enhance -> filter -> train (differential) -> fuse, where the model
of round k is the base with the LoRAs of rounds 1..k-1 fused in. After the last round (or a round
whose filter finds too little gain: the loop stops before training it), the rounds' LoRAs are
combined into one adapter, base and enhanced models are evaluated on held-out prompts, and the
report is written.

RUN_DIR/
  run.yaml, manifest.json        resolved config; status, counts, seconds and metrics per stage
  round-K/{generate,critique,enhance,filter}/   Parquet + _SUCCESS
  round-K/train/{latents,checkpoints,lora}/     lora/pytorch_lora_weights.safetensors: round K's LoRA
  round-K/fuse/_SUCCESS          the LoRAs the next round fuses, checked
  lora/combined.safetensors      the rounds' LoRAs as one adapter (+ _SUCCESS)
  evaluate/, report/index.html, logs/run.log (local run directories)

A stage is complete only when its `_SUCCESS` is written, last. `artaug run --resume RUN_DIR` skips
complete stages, discards a half-written one and redoes it (training resumes from its checkpoints).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
from importlib import resources

from artaug import storage
from artaug.cluster import init_ray
from artaug.config import ConfigError, RunConfig, load_config, to_yaml
from artaug.critique.session import CriticSession
from artaug.lora import WEIGHT_NAME, LoraFileError
from artaug.manifest import Manifest, RunDirError, config_hash
from artaug.observe import install_log_context, log_context, record_stage
from artaug.prompts import PromptSet, read_prompts

log = logging.getLogger(__name__)
ROUND_STAGES = ("generate", "critique", "enhance", "filter", "train", "fuse")
COMBINED = "combined.safetensors"


class RoundDirs:
    """Where round k's stages write."""

    def __init__(self, run_dir: str, k: int):
        self.root = storage.join(run_dir, f"round-{k}")
        for stage in ROUND_STAGES:
            setattr(self, stage, storage.join(self.root, stage))
        self.lora = storage.join(self.train, "lora")


def start(cfg: RunConfig, run_dir: str) -> Manifest:
    """A new run directory: refuses one that already holds a run (nothing there is overwritten)."""
    for name in ("manifest.json", "run.yaml"):
        if storage.exists(storage.join(run_dir, name)):
            raise RunDirError(
                f"{run_dir} already holds a run ({name}): continue it with `artaug run --resume {run_dir}`,"
                " or choose another --out"
            )
    storage.write_text(storage.join(run_dir, "run.yaml"), to_yaml(cfg))
    return Manifest.create(run_dir, cfg)


def reopen(run_dir: str) -> tuple[RunConfig, Manifest]:
    """The config and manifest of an unfinished run written by this version of artaug."""
    manifest = Manifest.load(run_dir)
    if manifest.data["status"] == "finished":
        report = storage.join(run_dir, "report", "index.html")
        raise RunDirError(f"{run_dir} has finished; nothing to resume (report: {report})")
    try:
        cfg = load_config(path=storage.join(run_dir, "run.yaml"))
    except ConfigError as err:
        raise RunDirError(f"{run_dir}/run.yaml: {err}") from None
    busy = manifest.live_attempt()
    if busy:
        raise RunDirError(
            f"{run_dir} is being worked on by artaug process {busy} on this host: wait or stop it"
        )
    if config_hash(cfg) != manifest.data["config_hash"]:
        raise RunDirError(
            f"{run_dir}/run.yaml changed since the run started (config hash {config_hash(cfg)},"
            f" manifest {manifest.data['config_hash']}): restore it, or start a new run"
        )
    return cfg, manifest


def train_prompts(cfg: RunConfig) -> PromptSet:
    return _prompts(cfg.prompts, "prompts.txt", cfg.loop.max_prompts)


def eval_prompts(cfg: RunConfig) -> PromptSet:
    return _prompts(cfg.loop.eval_prompts, "eval_prompts.txt", cfg.loop.eval_max_prompts)


def _prompts(path: str, shipped: str, limit: int) -> PromptSet:
    if path:
        prompts = read_prompts(path)
    else:
        with resources.as_file(resources.files("artaug.presets") / shipped) as local:
            prompts = read_prompts(str(local))
    if limit:
        prompts = dataclasses.replace(prompts, rows=prompts.rows[:limit])
    return prompts


class Loop:
    """Runs (or resumes) the rounds and the final stages, keeping the manifest in step."""

    def __init__(self, cfg: RunConfig, run_dir: str, manifest: Manifest):
        self.cfg, self.run_dir, self.manifest = cfg, run_dir, manifest
        self.session: CriticSession | None = None
        self.attempt = 0

    def run(self, resumed: bool = False) -> dict:
        self.manifest.begin_attempt(resumed)
        self.manifest.data.pop("stopped_early", None)  # decided again from the filter's results
        self.attempt = len(self.manifest.data["attempts"]) - 1
        if not storage.is_uri(self.run_dir):
            os.makedirs(os.path.join(self.run_dir, "logs"), exist_ok=True)
            install_log_context(os.path.join(self.run_dir, "logs", "run.log"))
        with log_context(run=self.cfg.name):
            try:
                init_ray(self.cfg.ray, output=self.run_dir)
                if CriticSession.applies(self.cfg.critique, self.cfg.loop.persistent_critic):
                    self.session = CriticSession(self.cfg.critique)
                loras = self._rounds()
                self._final(loras)
            except BaseException as err:
                self.manifest.set(status="failed" if isinstance(err, Exception) else "interrupted")
                raise
            finally:
                if self.session is not None:
                    self.session.close()
        self.manifest.finish()
        return self.manifest.data

    # ------------------------------------------------------------------ rounds

    def _rounds(self) -> list[str]:
        prompts = train_prompts(self.cfg)
        loras: list[str] = []
        rounds = self.cfg.loop.rounds
        for k in range(1, rounds + 1):
            with log_context(round=k):
                lora = self._round(k, rounds, prompts, loras)
            if lora is None:
                break
            loras.append(lora)
        return loras

    def _round(self, k: int, rounds: int, prompts: PromptSet, previous: list[str]) -> str | None:
        """Round k's stages; returns its LoRA, or None when the round stopped the loop before training."""
        from artaug.stages.critique import critique
        from artaug.stages.enhance import enhance
        from artaug.stages.filter import filter_pairs
        from artaug.stages.generate import generate
        from artaug.train.launch import train

        d = RoundDirs(self.run_dir, k)
        cfg = dataclasses.replace(
            self.cfg, model=dataclasses.replace(self.cfg.model, loras=[*self.cfg.model.loras, *previous])
        )
        label = f"round {k}/{rounds}"
        if self.session is not None and not storage.is_complete(d.critique):
            self.session.start()  # the engine loads while this round generates
        self._step(k, "generate", d.generate, label,
                   lambda: generate(cfg, prompts, d.generate, round_index=k, overwrite=True))  # fmt: skip
        self._step(k, "critique", d.critique, label,
                   lambda: critique(self._critic(cfg), d.generate, d.critique, overwrite=True))  # fmt: skip
        self._step(k, "enhance", d.enhance, label,
                   lambda: enhance(cfg, d.generate, d.critique, d.enhance, overwrite=True))  # fmt: skip
        verdict = self._step(k, "filter", d.filter, label,
                             lambda: filter_pairs(cfg, d.enhance, d.filter, overwrite=True))  # fmt: skip
        stop = self._stop_reason(verdict, d.filter)
        if stop:
            log.warning("%s: %s; the loop stops before training this round", label, stop)
            print(f"[{label}] stopping: {stop}")
            for stage in ("train", "fuse"):
                self.manifest.stage(k, stage).update(status="skipped", reason=stop)
            self.manifest.set(stopped_early={"round": k, "reason": stop})
            return None
        self._step(k, "train", d.lora, label,
                   lambda: train(cfg, d.filter, d.train, round_index=k), keep_partial=True)  # fmt: skip
        lora = storage.join(d.lora, WEIGHT_NAME)
        self._step(k, "fuse", d.fuse, label, lambda: register_lora(lora, previous, d.fuse))
        return lora

    def _critic(self, cfg: RunConfig) -> RunConfig:
        """The round's config with the critic routed to the run's warm engine, when there is one."""
        if self.session is None:
            return cfg
        engine = {"kind": "one vLLM engine for the run (OpenAI protocol)", "url": self.session.base_url}
        self.manifest.set(critic_engine=engine)
        return dataclasses.replace(cfg, critique=self.session.critique_config())

    def _stop_reason(self, verdict: dict, filter_dir: str) -> str | None:
        from artaug.stages.cache_latents import PairsError, eligible_pairs

        try:
            eligible_pairs(filter_dir)
        except PairsError as err:
            return str(err)
        loop = self.cfg.loop
        rate = verdict.get("acceptance_rate") or 0.0
        gain = verdict.get("mean_aesthetic_gain")
        if rate < loop.min_acceptance_rate:
            return f"acceptance rate {rate:.3f} < loop.min_acceptance_rate {loop.min_acceptance_rate}"
        if gain is None or gain < loop.min_aesthetic_gain:
            return f"mean aesthetic gain {gain} < loop.min_aesthetic_gain {loop.min_aesthetic_gain}"
        return None

    # ------------------------------------------------------------------ final stages

    def _final(self, loras: list[str]) -> None:
        from artaug.report import write_report

        folder = storage.join(self.run_dir, "lora")
        combined = storage.join(folder, COMBINED)
        if loras:
            self._step("final", "combine", folder, "final", lambda: combine_rounds(self.cfg, loras, folder))
        if loras and self.cfg.loop.evaluate:
            out = storage.join(self.run_dir, "evaluate")
            self._step("final", "evaluate", out, "final",
                       lambda: self._evaluate(combined, out), keep_partial=True)  # fmt: skip
        self._step("final", "report", storage.join(self.run_dir, "report"), "final",
                   lambda: write_report(self.run_dir, status="finished"), redo=True)  # fmt: skip

    def _evaluate(self, lora: str, out: str) -> dict:
        from artaug.stages.evaluate import evaluate

        prompts = eval_prompts(self.cfg)
        metrics_file = storage.join(out, "metrics.json")
        if not storage.exists(metrics_file):  # else: killed after the metrics, before the marker
            evaluate(self.cfg, [lora], prompts, out, judge_url=self._judge_engine())
        metrics = json.loads(storage.read_bytes(metrics_file))
        summary = {"stage": "evaluate", "rows": len(prompts.rows), "prompts": prompts.source,
                   "seconds": metrics.get("seconds")}  # fmt: skip
        storage.mark_complete(out, summary)
        return summary

    def _judge_engine(self):
        """A warm engine for the judge: the critic's when it is the same model, else one started now
        (it loads while evaluate generates). None: the judge runs its own backend as configured."""
        from artaug.stages.evaluate import judge_config, judge_model

        e = self.cfg.evaluate
        if not (e.judge and e.judge_backend == "vllm" and self.cfg.loop.persistent_critic):
            return None
        model = judge_model(self.cfg)
        if self.session is None or self.session.model != model:
            if self.session is not None:
                self.session.close()
            self.session = CriticSession(dataclasses.replace(judge_config(self.cfg), model=model))
        self.session.start()
        session = self.session
        return lambda: session.base_url

    # ------------------------------------------------------------------ one stage

    def _step(self, k, name: str, stage_dir: str, label: str, work, keep_partial=False, redo=False) -> dict:
        """Run one stage unless complete; a half-written output is discarded first (or kept, when the
        stage resumes by itself: training's checkpoints, evaluate's finished generations)."""
        with log_context(stage=name):
            if storage.is_complete(stage_dir) and not redo:
                summary = storage.read_summary(stage_dir)
                self.manifest.stage_done(k, name, summary, reused=True)
                log.info("complete in an earlier attempt: %s", stage_dir)
                print(f"[{label}] {name}: complete in an earlier attempt")
                return summary
            if storage.exists(stage_dir) and not keep_partial:
                log.warning("discarding the half-written %s", stage_dir)
                storage.remove_tree(stage_dir)
            print(f"[{label}] {name}: started")
            self.manifest.stage_started(k, name, stage_dir, self.attempt)
            try:
                summary = work()
            except BaseException as err:
                self.manifest.stage_failed(k, name, err)
                raise
            self.manifest.stage_done(k, name, summary)
            record_stage(self.cfg.name, k, name, summary)
            _log_row_errors(stage_dir)
            print(f"[{label}] {name}: {_one_line(summary)}")
            return summary


def register_lora(lora: str, previous: list[str], fuse_dir: str) -> dict:
    """Check round k's LoRA before later rounds fuse it: readable, transformer keys, finite values."""
    from safetensors.torch import load

    tensors = load(storage.read_bytes(lora))
    bad = sorted(key for key, tensor in tensors.items() if not tensor.isfinite().all())
    if bad:
        raise LoraFileError(
            f"{lora}: {len(bad)} tensor(s) hold NaN or inf (training diverged; e.g. lower"
            f" train.learning_rate), first: {bad[0]}"
        )
    ranks = [t.shape[0] for key, t in tensors.items() if key.endswith("lora_A.weight")]
    summary = {"stage": "fuse", "lora": lora, "loras": [*previous, lora], "layers": len(ranks),
               "rank": max(ranks, default=0), "seconds": 0.0}  # fmt: skip
    storage.mark_complete(fuse_dir, summary)
    return summary


def combine_rounds(cfg: RunConfig, loras: list[str], out_dir: str) -> dict:
    from artaug.lora import combine

    start = time.perf_counter()
    rank = cfg.loop.combine_rank or None
    summary = combine(loras, storage.join(out_dir, COMBINED), rank=rank, metadata={"rounds": len(loras)})
    summary = {**summary, "stage": "combine", "lora": storage.join(out_dir, COMBINED),
               "seconds": round(time.perf_counter() - start, 3)}  # fmt: skip
    storage.mark_complete(out_dir, summary)
    return summary


def _log_row_errors(stage_dir: str, limit: int = 20) -> None:
    """One log line per failed row, keyed by prompt_id (the summary only counts them)."""
    import pyarrow.parquet as pq

    fs, path = storage.resolve(stage_dir)
    try:
        table = pq.ParquetDataset(path, filesystem=fs).read(columns=["prompt_id", "error"])
    except Exception:  # noqa: BLE001 - stages without per-row errors (train, fuse, report)
        return
    failed = [(p, e) for p, e in zip(*table.to_pydict().values(), strict=True) if e]
    for prompt_id, error in failed[:limit]:
        log.warning("prompt_id=%s: %s", prompt_id, error)
    if len(failed) > limit:
        log.warning("... and %d more failed rows", len(failed) - limit)


_SHOWN = (
    "rows", "images", "ok", "invalid", "failed", "enhanced", "unchanged", "accepted", "acceptance_rate",
    "mean_aesthetic_gain", "steps", "final_loss", "errors", "rank", "seconds",
)  # fmt: skip


def _one_line(summary: dict) -> str:
    return ", ".join(f"{k} {_fmt(summary[k])}" for k in _SHOWN if summary.get(k) is not None)


def _fmt(value) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)
