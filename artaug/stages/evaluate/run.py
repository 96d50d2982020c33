"""Evaluate stage: the base model vs the enhanced model on the same prompts and seeds, with evidence.

1. generate with both models (the FLUX actor pool, twice, same seeds);
2. score both images of every prompt with the evaluation scorers (configured apart from the
   filter's: scoring with what the filter selected on would reward the selection itself) and the
   safety checker;
3. ask an MLLM judge which image is better, in both orders (`artaug.critic.judge`);
4. means with bootstrap confidence intervals, paired differences, win / tie / loss rates and the
   safety rate (`metrics`): metrics.json, report.txt and plots/*.svg (`presentation`).

Resumable: a completed generation of the same prompts is reused.

    artaug evaluate --base tiny --lora lora.safetensors --prompts eval.txt --out eval/
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging

import pyarrow as pa
import pyarrow.parquet as pq
import ray

from artaug import storage
from artaug.config import ModelConfig, RunConfig, to_yaml
from artaug.critic.engine import WarmEngine
from artaug.critic.judge import judge_model, judge_pairs
from artaug.models.synthesis import check_source
from artaug.prompts import PromptSet
from artaug.scorers.base import check_scorer_name, scorers_for_columns
from artaug.stages import inputs
from artaug.stages.contract import StageInputError, read_stage, reusable_summary, run_stage, stage
from artaug.stages.evaluate.metrics import IMAGES, compute_metrics, overlap_warnings
from artaug.stages.evaluate.presentation import format_table, write_charts
from artaug.stages.generator import generated_images
from artaug.stages.hosts import Hosts, hosts_for
from artaug.stages.scoring import check_sources, score_columns, score_images, scored_schema

log = logging.getLogger(__name__)
PAIRS = pa.schema(
    [("prompt_id", pa.string()), ("prompt", pa.string()), ("seed", pa.int64()), ("base", pa.binary()),
     ("lora", pa.binary()), ("error", pa.string())]
)  # fmt: skip
JUDGEMENTS = pa.schema(
    [("prompt_id", pa.string()), ("order", pa.string()), ("winner", pa.string()), ("reason", pa.string()),
     ("raw", pa.string()), ("error", pa.string())]
)  # fmt: skip


def _checks(cfg: RunConfig, prompts: PromptSet, stage_dir: str, base: ModelConfig, enhanced: ModelConfig,
            **_) -> None:  # fmt: skip
    inputs.compared(base, enhanced)
    for name in cfg.evaluate.scorers:
        try:
            check_scorer_name(name)
        except ValueError as err:
            raise StageInputError(f"evaluate.scorers: {err}") from None
    produced = score_columns(cfg.evaluate.scorers)
    for name in ("aesthetic", "alignment"):
        column = getattr(cfg.evaluate, name)
        if column and column not in produced:
            raise StageInputError(
                f"evaluate.{name}: {column!r} is not a column of evaluate.scorers ({produced})"
            )
    check_source(enhanced)
    check_sources(cfg.evaluate.scorers, cfg.scorers, cfg.safety if cfg.evaluate.safety else None)


@stage("evaluate", resumable=True, checks=_checks)
def evaluate(cfg: RunConfig, prompts: PromptSet, stage_dir: str, base: ModelConfig, enhanced: ModelConfig,
             judge_engine: WarmEngine | None = None,
             hosts: Hosts | None = None) -> dict:  # fmt: skip
    """Compare `base` with `enhanced` (the models' own LoRAs fused) into `stage_dir`; returns the metrics.
    Both generations and the scoring run on the run's warm `hosts` (else hosts of its own): one
    synthesis host moves between the two models by setting its LoRAs in place.

    `judge_engine`, when given, is a judge engine the caller keeps warm: it is asked for its endpoint
    only once the judge is needed (so it loads while the images are generated) and told how long it
    worked (its busy time).
    """
    warnings = overlap_warnings(cfg, scorers_for_columns([cfg.filter.aesthetic, cfg.filter.alignment]))
    for warning in warnings:
        log.warning(warning)
    model = judge_model(cfg) if cfg.evaluate.judge else None
    storage.write_text(storage.join(stage_dir, "run.yaml"), to_yaml(dataclasses.replace(cfg, model=enhanced)))
    with hosts_for(cfg, hosts) as warm:
        for label, which in zip(IMAGES, (base, enhanced), strict=True):
            folder = storage.join(stage_dir, label, "generate")
            if _reusable(folder, prompts):
                log.info("reusing the completed %s generation in %s", label, folder)
                continue
            model_cfg = dataclasses.replace(cfg, model=which)
            run_stage("generate", folder, lambda c=model_cfg, f=folder: _generate(c, prompts, f, warm),
                      overwrite=True)  # fmt: skip
        pairs = joined_pairs(stage_dir)
        scores = score_pairs(cfg, pairs, storage.join(stage_dir, "scores"), warm)
    judgements = None
    if cfg.evaluate.judge:
        endpoint = judge_engine.endpoint() if judge_engine else None
        with judge_engine.busy() if judge_engine else contextlib.nullcontext():
            judgements = judge_pairs(cfg, pairs.to_pylist(), model, endpoint)
        _write_table(pa.Table.from_pylist(judgements, schema=JUDGEMENTS), storage.join(stage_dir, "judge"))
    metrics = compute_metrics(cfg, scores, judgements)
    metrics.update(base={"source": base.source, "loras": list(base.loras)}, loras=list(enhanced.loras),
                   prompts_file=prompts.source, judge_model=model, warnings=warnings)  # fmt: skip
    write_charts(metrics, storage.join(stage_dir, "plots"))
    storage.write_text(storage.join(stage_dir, "report.txt"), format_table(metrics))
    storage.write_text(storage.join(stage_dir, "metrics.json"), json.dumps(metrics, indent=2, sort_keys=True))
    return {"rows": len(prompts.rows), "prompts": prompts.source}


def _generate(cfg: RunConfig, prompts: PromptSet, folder: str, hosts: Hosts) -> dict:
    generated_images(cfg, prompts, hosts).write_parquet(folder)
    return {"rows": len(prompts.rows), "prompts_source": prompts.source}


def _reusable(folder: str, prompts: PromptSet) -> bool:
    """A completed generation of these same prompts (an interrupted evaluation resumes from it)."""
    summary = reusable_summary(folder)  # None as well for a damaged one: it is generated again
    if summary is None:
        return False
    return summary.get("prompts_source") == prompts.source and summary.get("rows") == len(prompts.rows)


def joined_pairs(stage_dir: str) -> pa.Table:
    """One row per prompt with both images (an error when either generation failed)."""
    columns = ["prompt_id", "prompt", "seed", "image", "error"]
    tables = [read_stage(storage.join(stage_dir, label, "generate"), columns) for label in IMAGES]
    base, lora = ({row["prompt_id"]: row for row in table.to_pylist()} for table in tables)
    rows = []
    for prompt_id, b in base.items():
        other = lora.get(prompt_id, {"image": None, "error": "no LoRA row"})
        errors = [f"{label}: {r['error']}" for label, r in (("base", b), ("lora", other)) if r.get("error")]
        rows.append({"prompt_id": prompt_id, "prompt": b["prompt"], "seed": b["seed"], "base": b["image"],
                     "lora": other["image"], "error": "; ".join(errors) or None})  # fmt: skip
    return pa.Table.from_pylist(rows, schema=PAIRS)


def score_pairs(cfg: RunConfig, pairs: pa.Table, folder: str, hosts: Hosts) -> pa.Table:
    safety = cfg.safety if cfg.evaluate.safety else None
    out_schema = scored_schema(PAIRS, cfg.evaluate.scorers, IMAGES, safety is not None)
    ds = ray.data.from_arrow(pairs).repartition(max(1, min(pairs.num_rows, 2 * cfg.scorers.num_actors)))
    storage.remove_tree(folder)
    score_images(ds, hosts, cfg.scorers, cfg.evaluate.scorers, safety, IMAGES, out_schema).drop_columns(
        list(IMAGES)
    ).write_parquet(folder)
    return read_stage(folder)


def _write_table(table: pa.Table, folder: str) -> None:
    storage.remove_tree(folder)
    fs, path = storage.resolve(folder)
    fs.create_dir(path, recursive=True)
    pq.write_table(table.sort_by([("prompt_id", "ascending"), ("order", "ascending")]),
                   storage.join(path, "judgements.parquet"), filesystem=fs)  # fmt: skip
