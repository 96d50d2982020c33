"""`artaug run`: the ArtAug loop over rounds, resumable from its run directory.

Round k: generate -> critique -> enhance -> filter -> train (differential) -> register, where the
model of round k is the configured model with the LoRAs of rounds 1..k-1 fused in
(`models.lineage.model_of_round`); with `loop.overlap_stages`, the critique starts on generate's
first parts and the latent cache on the filter's (`artaug.loop.overlap`).
After the last round (or a round whose filter finds too little gain: the loop stops before training
it), the rounds' LoRAs are combined into one adapter, the configured model and the enhanced model
(`enhanced_model`: what `artaug serve` serves) are evaluated on held-out prompts, and the report is
written. Where each output lives:
`artaug.layout.RunLayout`.

The loop alone decides that a complete stage is skipped: `artaug run --resume RUN_DIR` skips
complete stages, discards a half-written one and redoes it (generate and enhance keep their complete
parts, training and evaluation resume from their own partial outputs).
"""

from __future__ import annotations

import dataclasses
import logging
import os

import pyarrow.parquet as pq

from artaug import storage
from artaug.cluster import init_ray
from artaug.config import CritiqueConfig, ModelConfig, RunConfig
from artaug.critic.backends import critic_model
from artaug.critic.engine import WarmEngine
from artaug.critic.judge import judge_config, judge_model
from artaug.layout import RunLayout
from artaug.loop.manifest import Manifest
from artaug.loop.observe import log_context, record_stage, run_logging
from artaug.loop.overlap import Background, EarlyCache, caches_early, critique_follows, overlapped
from artaug.loop.prompt_sets import eval_prompts, train_prompts
from artaug.loop.report import write_report
from artaug.lora.algebra import combine_rounds
from artaug.lora.files import check_finite
from artaug.models.lineage import enhanced_model, model_of_round
from artaug.prompts import PromptSet
from artaug.stages.contract import reusable_summary, run_stage
from artaug.stages.critique import critique
from artaug.stages.enhance import enhance
from artaug.stages.evaluate import evaluate
from artaug.stages.filter import filter_pairs
from artaug.stages.generate import generate
from artaug.stages.hosts import Hosts, hosts_summary
from artaug.stages.train import train
from artaug.train.pairs import PairsError, eligible_pairs

log = logging.getLogger(__name__)


class Loop:
    """Runs (or resumes) the rounds and the final stages, keeping the manifest in step."""

    def __init__(self, cfg: RunConfig, run_dir: str, manifest: Manifest):
        self.cfg, self.layout, self.manifest = cfg, RunLayout(run_dir), manifest
        self.engine: WarmEngine | None = None
        self.engines: list[tuple[str, WarmEngine]] = []  # (role, engine): every engine this attempt held
        self.hosts: Hosts | None = None
        self.attempt = 0

    def run(self, resumed: bool = False) -> dict:
        self.manifest.begin_attempt(resumed)
        self.manifest.data.pop("stopped_early", None)  # decided again from the filter's results
        self.attempt = len(self.manifest.data["attempts"]) - 1
        log_file = None
        if not storage.is_uri(self.layout.root):  # no log file on object storage: it cannot append
            os.makedirs(os.path.dirname(self.layout.log_file), exist_ok=True)
            log_file = self.layout.log_file
        with run_logging(log_file), log_context(run=self.cfg.name):
            try:
                init_ray(self.cfg.ray, output=self.layout.root)
                self.hosts = Hosts(self.cfg)
                if WarmEngine.applies(self.cfg.critique, self.cfg.loop.persistent_critic):
                    self._hold_engine("critic", self.cfg.critique, critic_model(self.cfg.critique))
                loras = self._rounds()
                self._final(loras)
            except BaseException as err:
                self.manifest.set(status="failed" if isinstance(err, Exception) else "interrupted")
                raise
            finally:
                if self.engine is not None:
                    self.engine.close()
                try:  # never hide the error that ended the run behind one about the hosts
                    self._record_pools()
                    if self.hosts is not None:
                        self.hosts.close()
                except Exception as err:  # noqa: BLE001
                    log.warning("could not record or close the model hosts: %s", err)
        self.manifest.finish(self._ending)
        return self.manifest.data

    @property
    def _ending(self) -> str:
        """ "stopped" when a round's filter stopped the loop (the manifest says why), else "finished"."""
        return "stopped" if self.manifest.data.get("stopped_early") else "finished"

    # ------------------------------------------------------------------ rounds

    def _rounds(self) -> list[str]:
        loras: list[str] = []
        for k in range(1, self.cfg.loop.rounds + 1):
            with log_context(round=k):
                lora = self._round(k, train_prompts(self.cfg, k), loras)
            if lora is None:
                break
            loras.append(lora)
        return loras

    def _round(self, k: int, prompts: PromptSet, earlier: list[str]) -> str | None:
        """Round k's stages; returns its LoRA, or None when the round stopped the loop before training."""
        d = self.layout.round(k)
        cfg = dataclasses.replace(self.cfg, model=model_of_round(self.cfg.model, earlier))
        label = f"round {k}/{self.cfg.loop.rounds}"
        if self.engine is not None and not storage.is_complete(d.stage("critique")):
            self.engine.start()  # the engine loads while this round generates
        step = lambda name, work, **kw: self._step(k, name, d.stage(name), label, work, **kw)  # noqa: E731
        # generate and enhance keep the complete parts of a stopped attempt (`artaug.stages.parts`);
        # the critique reads generate's parts and the latent cache the filter's as they land
        overlapped(
            lambda: step("generate", lambda: generate(cfg, prompts, d.stage("generate"), round_index=k,
                                                      hosts=self.hosts), keep_partial=True),
            lambda writer: step("critique", lambda: self._critique(cfg, d.stage("generate"),
                                                                   d.stage("critique"), writer)),
            critique_follows(cfg, self.engine is not None),
        )  # fmt: skip
        step("enhance", lambda: enhance(cfg, d.stage("generate"), d.stage("critique"), d.stage("enhance"),
                                        hosts=self.hosts), keep_partial=True)  # fmt: skip
        cache = EarlyCache(cfg, d, self.hosts)
        verdict = overlapped(
            lambda: step("filter", lambda: filter_pairs(cfg, d.stage("enhance"), d.stage("filter"),
                                                        hosts=self.hosts, overwrite=True)),
            cache, caches_early(cfg, d),
        )  # fmt: skip
        stop = self._stop_reason(verdict, d.stage("filter"))
        if stop:
            cache.discard()
            log.warning("%s: %s; the loop stops before training this round", label, stop)
            print(f"[{label}] stopping: {stop}")
            for name in ("train", "register"):
                self.manifest.stage(k, name).update(status="skipped", reason=stop)
            self.manifest.set(stopped_early={"round": k, "reason": stop})
            return None
        if cache.summary is not None:
            self.manifest.stage(k, "train")["latent_cache"] = _early_cache_entry(cache.summary)
            print(f"[{label}] train: latent cache of {cache.summary['pairs']} pairs encoded while the"
                  f" filter ran ({cache.summary['seconds']:.1f} s)")  # fmt: skip
        step("train", lambda: train(cfg, d.stage("filter"), d.stage("train"), round_index=k,
                                    hosts=self.hosts), keep_partial=True)  # fmt: skip
        lora = d.train.lora
        step("register", lambda: run_stage("register", d.stage("register"), lambda: register(lora, earlier)))
        return lora

    def _record_pools(self) -> None:
        """The counters so far of the model hosts (loads, calls, busy fraction) and of the critic
        engines (seconds held and busy) into the manifest."""
        if self.hosts is not None:
            self.manifest.set(hosts=hosts_summary(self.hosts.stats()))
        if self.engines:
            self.manifest.set(engines=[{"role": role, **engine.usage()} for role, engine in self.engines])

    def _hold_engine(self, role: str, cfg: CritiqueConfig, model: str) -> WarmEngine:
        self.engine = WarmEngine(cfg, model, local=self._local)
        self.engines.append((role, self.engine))
        return self.engine

    @property
    def _local(self) -> bool:
        """The run's Ray is private to this machine: its engine binds loopback."""
        return self.cfg.ray.address == "local"

    def _critique(self, cfg: RunConfig, images: str, out: str, writer: Background | None) -> dict:
        """The critique stage (following `images` while `writer` writes it), on the run's warm engine
        when there is one (its busy time: the stage's requests, not its waits for images)."""
        if self.engine is None:
            return critique(cfg, images, out, writer=writer, overwrite=True)
        endpoint = self.engine.endpoint()  # checks the engine's health; restarts a dead one once
        return critique(cfg, images, out, endpoint=endpoint, writer=writer, asking=self.engine.busy,
                        overwrite=True)  # fmt: skip

    def _stop_reason(self, verdict: dict, filter_dir: str) -> str | None:
        loop = self.cfg.loop
        rate = verdict.get("acceptance_rate") or 0.0
        gain = verdict.get("mean_aesthetic_gain")
        if rate < loop.min_acceptance_rate:
            return f"acceptance rate {rate:.3f} < loop.min_acceptance_rate {loop.min_acceptance_rate}"
        try:
            eligible_pairs(filter_dir)
        except PairsError as err:
            return str(err)
        if gain is None or gain < loop.min_aesthetic_gain:
            return f"mean aesthetic gain {gain} < loop.min_aesthetic_gain {loop.min_aesthetic_gain}"
        return None

    # ------------------------------------------------------------------ final stages

    def _final(self, loras: list[str]) -> None:
        layout, cfg = self.layout, self.cfg
        if loras:
            rank = cfg.loop.combine_rank or None
            combine = lambda: combine_rounds(loras, layout.combined_lora, rank)  # noqa: E731
            self._step("final", "combine", layout.combine, "final",
                       lambda: run_stage("combine", layout.combine, combine))  # fmt: skip
        if loras and cfg.loop.evaluate:
            base, enhanced = evaluated_models(cfg, layout)
            self._step("final", "evaluate", layout.evaluate, "final", lambda: evaluate(
                cfg, eval_prompts(cfg), layout.evaluate, base=base, enhanced=enhanced,
                judge_engine=self._judge_engine(), hosts=self.hosts, overwrite=False),
                keep_partial=True)  # fmt: skip
        self._step("final", "report", layout.report, "final",
                   lambda: write_report(layout.root, status=self._ending), redo=True)  # fmt: skip

    def _judge_engine(self) -> WarmEngine | None:
        """A warm engine for the judge: the critic's when it is the same model, else one started now
        (it loads while evaluate generates). None: the judge runs its own backend as configured."""
        if not (
            self.cfg.evaluate.judge
            and self.cfg.evaluate.judge_backend == "vllm"
            and self.cfg.loop.persistent_critic
        ):
            return None
        model = judge_model(self.cfg)
        if self.engine is None or self.engine.model != model:
            if self.engine is not None:
                self.engine.close()
            self._hold_engine("judge", judge_config(self.cfg), model)
        self.engine.start()
        return self.engine

    # ------------------------------------------------------------------ one stage

    def _step(self, k, name: str, stage_dir: str, label: str, work, keep_partial=False, redo=False) -> dict:
        """Run one stage unless complete; a half-written output is discarded first (or kept, when the
        stage resumes by itself: training's checkpoints, evaluate's finished generations)."""
        with log_context(stage=name):
            summary = None if redo else reusable_summary(stage_dir)
            if summary is not None:
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
            self._record_pools()
            record_stage(self.cfg.name, k, name, summary)
            _log_row_errors(stage_dir)
            print(f"[{label}] {name}: {_one_line(summary)}")
            return summary


def _early_cache_entry(summary: dict) -> dict:
    return {"while": "filter", **{key: summary[key] for key in ("pairs", "usable", "seconds")}}


def evaluated_models(cfg: RunConfig, layout: RunLayout) -> tuple[ModelConfig, ModelConfig]:
    """(base, enhanced) of the final evaluation: the model the run started from (its own LoRAs
    included) and that model with the combined LoRA, which is what `artaug serve RUN_DIR` serves."""
    return cfg.model, enhanced_model(cfg.model, layout.combined_lora)


def register(lora: str, earlier: list[str]) -> dict:
    """Check round k's LoRA before later rounds fuse it: readable, finite values."""
    tensors = check_finite(lora)
    ranks = [t.shape[0] for key, t in tensors.items() if key.endswith("lora_A.weight")]
    return {"lora": lora, "loras": [*earlier, lora], "layers": len(ranks), "rank": max(ranks, default=0)}


def _log_row_errors(stage_dir: str, limit: int = 20) -> None:
    """One log line per failed row, keyed by prompt_id (the summary only counts them)."""
    fs, path = storage.resolve(stage_dir)
    try:
        table = pq.ParquetDataset(path, filesystem=fs).read(columns=["prompt_id", "error"])
    except Exception:  # noqa: BLE001 - stages without per-row errors (train, register, report)
        return
    failed = [(p, e) for p, e in zip(*table.to_pydict().values(), strict=True) if e]
    for prompt_id, error in failed[:limit]:
        log.warning("prompt_id=%s: %s", prompt_id, error)
    if len(failed) > limit:
        log.warning("... and %d more failed rows", len(failed) - limit)


_SHOWN = (
    "rows", "images", "ok", "invalid", "failed", "enhanced", "unchanged", "accepted", "acceptance_rate",
    "mean_aesthetic_gain", "steps", "final_loss", "errors", "rank", "first_work_s", "first_output_s",
    "seconds",
)  # fmt: skip


def _one_line(summary: dict) -> str:
    return ", ".join(f"{k} {_fmt(summary[k])}" for k in _SHOWN if summary.get(k) is not None)


def _fmt(value) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)
