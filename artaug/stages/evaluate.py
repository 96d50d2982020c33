"""Evaluate a LoRA: base vs base + LoRA on the same prompts and seeds, with evidence.

1. generate with the base model and with base + LoRA (the generate stage, twice, same seeds);
2. score both images of every prompt with the evaluation scorers (configured apart from the
   filter's: scoring with what the filter selected on would reward the selection itself) and the
   safety checker;
3. ask an MLLM judge which image is better, in both orders (see artaug.judge);
4. report means with bootstrap confidence intervals, paired differences, win / tie / loss rates
   and the safety rate: metrics.json, a printed table, and charts.

    artaug evaluate --base tiny --lora lora.safetensors --prompts eval.txt --out eval/
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time

import pyarrow as pa
import ray

from artaug import charts, stats, storage
from artaug.cluster import init_ray
from artaug.config import RunConfig, to_yaml
from artaug.judge import ORDERS, ask_judge, judge_rows, parse_judgement
from artaug.models.synthesis import check_source
from artaug.prompts import PromptSet
from artaug.scorers.base import check_scorer_name
from artaug.stages.generate import generate, read_stage
from artaug.stages.scoring import check_sources, score_columns, score_images, scored_schema

log = logging.getLogger(__name__)
IMAGES = ("base", "lora")
PAIRS = pa.schema(
    [("prompt_id", pa.string()), ("prompt", pa.string()), ("seed", pa.int64()), ("base", pa.binary()),
     ("lora", pa.binary()), ("error", pa.string())]
)  # fmt: skip


class EvaluateInputError(ValueError):
    """Nothing to compare, or an evaluation setting that cannot work; the message says which."""


def judge_config(cfg: RunConfig):
    """The critic's settings with the judge's backend, model, endpoint and token budget."""
    e = cfg.evaluate
    return dataclasses.replace(
        cfg.critique,
        backend=e.judge_backend,
        model=e.judge_model,
        base_url=e.judge_base_url or cfg.critique.base_url,
        max_tokens=e.judge_max_tokens,
        temperature=0.0,
    )


def judge_model(cfg: RunConfig) -> str:
    e = cfg.evaluate
    if e.judge_backend == "vllm" and e.judge_model == "tiny":
        from artaug.models.tiny_vlm import ensure_tiny_vlm

        return ensure_tiny_vlm(cfg.critique.cache_dir, seed=e.judge_tiny_seed)
    if e.judge_backend == "vllm":
        from artaug.stages.critique import critic_model

        return critic_model(judge_config(cfg))
    return e.judge_model


def overlap_warnings(cfg: RunConfig) -> list[str]:
    from artaug.stages.filter import scorer_names

    warnings = []
    shared = sorted(set(cfg.evaluate.scorers) & set(scorer_names(cfg.filter)))
    if shared:
        warnings.append(
            f"evaluation scorers {shared} are ones the filter selected pairs with: their gains partly measure"
            " the selection itself; prefer scorers the filter did not use"
        )
    same_tiny = cfg.evaluate.judge_model == "tiny" and cfg.critique.model == "tiny"
    if cfg.evaluate.judge and cfg.evaluate.judge_model == cfg.critique.model and not same_tiny:
        warnings.append(
            f"the judge is the critic's model ({cfg.critique.model}): it may favour its own advice"
        )
    return warnings


def evaluate(
    cfg: RunConfig, loras: list[str], prompts: PromptSet, out: str, overwrite: bool = False, judge_url=None
) -> dict:
    """Run the evaluation into `out`; returns the metrics written to out/metrics.json.

    `judge_url`, when given, is called for the base URL of a judge engine the caller keeps warm
    (asked only once the judge is needed, so the engine can load while the images are generated).
    """
    e = cfg.evaluate
    if not loras:
        raise EvaluateInputError("nothing to compare: give at least one --lora (or set model.loras)")
    for name in e.scorers:
        try:
            check_scorer_name(name)
        except ValueError as err:
            raise EvaluateInputError(f"evaluate.scorers: {err}") from None
    base_cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, loras=[]))
    lora_cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, loras=list(loras)))
    check_source(lora_cfg.model)
    check_sources(e.scorers, cfg.scorers, cfg.safety if e.safety else None)
    warnings = overlap_warnings(cfg)
    for warning in warnings:
        log.warning(warning)
    model = judge_model(cfg) if e.judge else None
    if storage.exists(storage.join(out, "metrics.json")) and not overwrite:
        from artaug.stages.generate import StageDoneError

        raise StageDoneError(f"{out} already holds an evaluation (use --overwrite)")
    storage.write_text(storage.join(out, "run.yaml"), to_yaml(lora_cfg))
    init_ray(cfg.ray, output=out)
    start = time.perf_counter()
    for label, stage_cfg in (("base", base_cfg), ("lora", lora_cfg)):
        stage = storage.join(out, label, "generate")
        if not overwrite and _reusable(stage, prompts):
            log.info("reusing the completed %s generation in %s", label, stage)
        else:
            generate(stage_cfg, prompts, stage, overwrite=True)
    pairs = joined_pairs(out)
    scores = score_pairs(cfg, pairs, storage.join(out, "scores"))
    judgements = None
    if e.judge:
        judge_cfg = cfg
        if judge_url is not None:
            routed = dataclasses.replace(e, judge_backend="openai", judge_base_url=judge_url())
            judge_cfg = dataclasses.replace(cfg, evaluate=routed)
        judgements = run_judge(judge_cfg, model, pairs, storage.join(out, "judge"))
    metrics = compute_metrics(cfg, scores, judgements)
    metrics.update(
        base=cfg.model.source, loras=list(loras), prompts_file=prompts.source, judge_model=model,
        warnings=warnings, seconds=round(time.perf_counter() - start, 3),
    )  # fmt: skip
    write_charts(metrics, storage.join(out, "plots"))
    table = format_table(metrics)
    storage.write_text(storage.join(out, "report.txt"), table)
    storage.write_text(storage.join(out, "metrics.json"), json.dumps(metrics, indent=2, sort_keys=True))
    return metrics


def _reusable(stage: str, prompts: PromptSet) -> bool:
    """A completed generation of these same prompts (an interrupted evaluation resumes from it)."""
    if not storage.is_complete(stage):
        return False
    summary = storage.read_summary(stage)
    return summary.get("prompts_source") == prompts.source and summary.get("rows") == len(prompts.rows)


def joined_pairs(out: str) -> pa.Table:
    """One row per prompt with both images (an error when either generation failed)."""
    columns = ["prompt_id", "prompt", "seed", "image", "error"]
    base = {r["prompt_id"]: r for r in read_stage(storage.join(out, "base", "generate"), columns).to_pylist()}
    lora = {r["prompt_id"]: r for r in read_stage(storage.join(out, "lora", "generate"), columns).to_pylist()}
    rows = []
    for prompt_id, b in base.items():
        other = lora.get(prompt_id, {"image": None, "error": "no LoRA row"})
        errors = [f"{label}: {r['error']}" for label, r in (("base", b), ("lora", other)) if r.get("error")]
        rows.append({"prompt_id": prompt_id, "prompt": b["prompt"], "seed": b["seed"], "base": b["image"],
                     "lora": other["image"], "error": "; ".join(errors) or None})  # fmt: skip
    return pa.Table.from_pylist(rows, schema=PAIRS)


def score_pairs(cfg: RunConfig, pairs: pa.Table, stage_dir: str) -> pa.Table:
    s, e = cfg.scorers, cfg.evaluate
    safety = cfg.safety if e.safety else None
    out_schema = scored_schema(PAIRS, e.scorers, IMAGES, safety is not None)
    ds = ray.data.from_arrow(pairs).repartition(max(1, min(pairs.num_rows, 2 * s.num_actors)))
    ds = score_images(ds, s, e.scorers, safety, IMAGES, out_schema)
    storage.remove_tree(stage_dir)
    ds.drop_columns(list(IMAGES)).write_parquet(stage_dir)
    table = read_stage(stage_dir)
    storage.mark_complete(stage_dir, {"stage": "evaluate-scores", "rows": table.num_rows})
    return table


JUDGEMENTS = pa.schema(
    [("prompt_id", pa.string()), ("order", pa.string()), ("winner", pa.string()), ("reason", pa.string()),
     ("raw", pa.string()), ("error", pa.string())]
)  # fmt: skip


def run_judge(cfg: RunConfig, model: str, pairs: pa.Table, stage_dir: str) -> pa.Table:
    """Two judgements per prompt with both images; prompts without both are not asked (counted)."""
    usable = [row for row in pairs.to_pylist() if row["base"] and row["lora"]]
    rows = judge_rows(usable, cfg.evaluate.judge_image_side)
    answers = []
    if rows:
        ds = ray.data.from_items(rows, override_num_blocks=min(len(rows), 8))
        answers = ask_judge(ds, judge_config(cfg), model).take_all()
    out = []
    for answer in answers:
        prompt_id, order = answer["prompt_id"].rsplit("#", 1)
        winner, reason = parse_judgement(answer["raw"]) if not answer.get("error") else (None, "no answer")
        out.append({"prompt_id": prompt_id, "order": order, "winner": winner, "reason": reason,
                    "raw": answer["raw"], "error": answer.get("error")})  # fmt: skip
    table = pa.Table.from_pylist(out, schema=JUDGEMENTS).sort_by(
        [("prompt_id", "ascending"), ("order", "ascending")]
    )
    storage.remove_tree(stage_dir)
    fs, path = storage.resolve(stage_dir)
    fs.create_dir(path, recursive=True)
    import pyarrow.parquet as pq

    pq.write_table(table, storage.join(path, "judgements.parquet"), filesystem=fs)
    storage.mark_complete(stage_dir, {"stage": "evaluate-judge", "rows": table.num_rows, "model": model})
    return table


def compute_metrics(cfg: RunConfig, scores: pa.Table, judgements: pa.Table | None) -> dict:
    e = cfg.evaluate
    opts = {"samples": e.bootstrap_samples, "confidence": e.confidence, "seed": e.seed}
    rows = scores.to_pylist()
    metrics: dict = {
        "prompts": len(rows),
        "generation_errors": sum(1 for r in rows if r["error"]),
        "confidence": e.confidence,
        "bootstrap_samples": e.bootstrap_samples,
        "scores": {},
    }
    for column in score_columns(e.scorers):
        base = [_nan(r[f"{column}_base"]) for r in rows]
        lora = [_nan(r[f"{column}_lora"]) for r in rows]
        metrics["scores"][column] = stats.paired(base, lora, **opts)
    if e.safety:
        metrics["safety"] = {
            label: {
                "checked": sum(r[f"unsafe_{label}"] is not None for r in rows),
                "unsafe": sum(bool(r[f"unsafe_{label}"]) for r in rows),
                "unsafe_rate": _rate([r[f"unsafe_{label}"] for r in rows]),
            }
            for label in IMAGES
        }
    if judgements is not None:
        metrics["judge"] = judge_metrics(rows, judgements.to_pylist(), opts)
    return metrics


def judge_metrics(rows: list[dict], judgements: list[dict], opts: dict) -> dict:
    by_key = {(j["prompt_id"], j["order"]): j["winner"] for j in judgements}
    ids = [r["prompt_id"] for r in rows]
    winners = {order: [by_key.get((pid, order)) for pid in ids] for order in ORDERS}
    votes = {order: [stats.vote(w, "right" if order == "lora_right" else "left") for w in winners[order]]
             for order in ORDERS}  # fmt: skip
    outcomes = stats.symmetrise(votes["lora_right"], votes["lora_left"])
    per_order = {}
    for order in ORDERS:
        single = [
            None if v is None else ("win" if v > 0 else "loss" if v < 0 else "tie") for v in votes[order]
        ]
        per_order[order] = stats.win_rates(single, **opts)
    all_winners = winners["lora_right"] + winners["lora_left"]
    return {
        "kind": "MLLM judge (not human preference)",
        **stats.win_rates(outcomes, **opts),
        "judgements": len(judgements),
        "unparseable_or_missing_judgements": sum(w is None for w in all_winners),
        "left_share": stats.left_share(all_winners),
        "per_order": per_order,
    }


def _nan(value) -> float:
    return float("nan") if value is None else float(value)


def _rate(flags: list) -> float | None:
    known = [bool(f) for f in flags if f is not None]
    return sum(known) / len(known) if known else None


def write_charts(metrics: dict, folder: str) -> None:
    level = f"{metrics['confidence']:.0%} bootstrap intervals over {metrics['prompts']} prompts"
    means, differences = [], []
    for column, result in metrics["scores"].items():
        for label in IMAGES:
            means.append((f"{column} {label}", label, result[label]["mean"], result[label]["ci"]))
        differences.append((column, "lora", result["difference"]["mean"], result["difference"]["ci"]))
    storage.write_bytes(
        storage.join(folder, "scores.png"),
        charts.png_bytes(
            charts.interval_chart(
                "Mean scores: base vs base + LoRA (own axis per score)", level, means, group=2
            )
        ),
    )
    storage.write_bytes(storage.join(folder, "differences.png"), charts.png_bytes(
        charts.interval_chart("Paired difference (base + LoRA minus base)", level, differences)))  # fmt: skip
    if "judge" in metrics:
        note = f"both orders per prompt; ties and missing judgements shown apart; {level}"
        storage.write_bytes(storage.join(folder, "mllm_win_rate.png"),
                            charts.png_bytes(charts.win_rate_chart(metrics["judge"], note)))  # fmt: skip


def format_table(metrics: dict) -> str:
    def ci(interval) -> str:
        return f"[{interval[0]:.4g}, {interval[1]:.4g}]" if interval else "[n/a]"

    def num(value) -> str:
        return "n/a" if value is None else f"{value:.4g}"

    def pct(value) -> str:
        return "n/a" if value is None else f"{value:.1%}"

    def pcts(interval) -> str:
        return f"[{interval[0]:.1%}, {interval[1]:.1%}]" if interval else "[n/a]"

    level = f"{metrics['confidence']:.0%} CI"
    lines = [
        f"{'score':<24} {'base':>10} {'base+LoRA':>10} {'difference':>11} {level:>22} {'LoRA higher':>11}"
    ]
    for column, r in metrics["scores"].items():
        d = r["difference"]
        higher = "n/a" if r["lora_higher_share"] is None else f"{r['lora_higher_share']:.0%}"
        lines.append(f"{column:<24} {num(r['base']['mean']):>10} {num(r['lora']['mean']):>10} "
                     f"{num(d['mean']):>11} {ci(d['ci']):>22} {higher:>11}")  # fmt: skip
    if "safety" in metrics:
        s = metrics["safety"]
        lines.append(f"unsafe images: base {s['base']['unsafe']}/{s['base']['checked']},"
                     f" base+LoRA {s['lora']['unsafe']}/{s['lora']['checked']}")  # fmt: skip
    if "judge" in metrics:
        j = metrics["judge"]
        lines.append(
            f"MLLM judge (not human), both orders: win {pct(j['win_rate'])} {pcts(j['win_rate_ci'])},"
            f" tie {pct(j['tie_rate'])}, loss {pct(j['loss_rate'])} {pcts(j['loss_rate_ci'])}"
            f" over {j['judged']} prompts; {j['missing']} prompts missing"
            f" ({j['unparseable_or_missing_judgements']} judgements unparseable or absent);"
            f" left image picked in {pct(j['left_share'])} of decisive judgements"
        )
    for warning in metrics.get("warnings", []):
        lines.append(f"warning: {warning}")
    return "\n".join(lines) + "\n"
