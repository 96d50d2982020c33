"""What an evaluation measures: paired score differences with bootstrap intervals, the safety rate
and the judge's win rates (`artaug.critic.judge`), and warnings about measuring the selection itself."""

from __future__ import annotations

import pyarrow as pa

from artaug import stats
from artaug.config import BUILT_IN_VLMS, RunConfig
from artaug.critic.judge import judge_metrics
from artaug.stages.scoring import score_columns

IMAGES = ("base", "lora")


def overlap_warnings(cfg: RunConfig, filter_scorers: list[str]) -> list[str]:
    """Scores the filter selected on, or a judge that is the critic: their verdicts are not independent."""
    warnings = []
    shared = sorted(set(cfg.evaluate.scorers) & set(filter_scorers))
    if shared:
        warnings.append(
            f"evaluation scorers {shared} are ones the filter selected pairs with: their gains partly measure"
            " the selection itself; prefer scorers the filter did not use"
        )
    same_tiny = cfg.critique.model in BUILT_IN_VLMS  # the judge's own seed: another random model
    if cfg.evaluate.judge and cfg.evaluate.judge_model == cfg.critique.model and not same_tiny:
        warnings.append(
            f"the judge is the critic's model ({cfg.critique.model}): it may favour its own advice"
        )
    return warnings


def compute_metrics(cfg: RunConfig, scores: pa.Table, judgements: list[dict] | None) -> dict:
    opts = {
        "samples": cfg.evaluate.bootstrap_samples,
        "confidence": cfg.evaluate.confidence,
        "seed": cfg.evaluate.seed,
    }
    rows = scores.to_pylist()
    metrics: dict = {
        "prompts": len(rows),
        "generation_errors": sum(1 for r in rows if r["error"]),
        "confidence": cfg.evaluate.confidence,
        "bootstrap_samples": cfg.evaluate.bootstrap_samples,
        "scores": {},
    }
    prompts = [r["prompt"] for r in rows]  # the seeds of one prompt are resampled together
    for column in score_columns(cfg.evaluate.scorers):
        base = [_nan(r[f"{column}_base"]) for r in rows]
        lora = [_nan(r[f"{column}_lora"]) for r in rows]
        metrics["scores"][column] = stats.paired(base, lora, **opts, clusters=prompts)
    metrics["distinct_prompts"] = len(set(prompts))
    metrics["verdict"] = verdict(cfg, metrics["scores"])
    if cfg.evaluate.safety:
        metrics["safety"] = {
            label: {
                "checked": sum(r[f"unsafe_{label}"] is not None for r in rows),
                "unsafe": sum(bool(r[f"unsafe_{label}"]) for r in rows),
                "unsafe_rate": _rate([r[f"unsafe_{label}"] for r in rows]),
            }
            for label in IMAGES
        }
    if judgements is not None:
        metrics["judge"] = judge_metrics([r["prompt_id"] for r in rows], judgements, opts)
    return metrics


def verdict(cfg: RunConfig, scores: dict) -> dict:
    """Did the enhanced model win on evaluate.aesthetic (interval above 0) while evaluate.alignment held
    (lower bound above -evaluate.alignment_margin)? Only for the columns configured."""
    out: dict = {}
    rule = cfg.evaluate
    if rule.aesthetic:
        ci = scores[rule.aesthetic]["difference"]["ci"]
        out["aesthetic"] = {"column": rule.aesthetic, "ci": ci, "better": bool(ci and ci[0] > 0)}
    if rule.alignment:
        ci = scores[rule.alignment]["difference"]["ci"]
        held = bool(ci and ci[0] > -rule.alignment_margin)
        out["alignment"] = {"column": rule.alignment, "ci": ci, "margin": rule.alignment_margin, "held": held}
    return out


def _nan(value) -> float:
    return float("nan") if value is None else float(value)


def _rate(flags: list) -> float | None:
    known = [bool(f) for f in flags if f is not None]
    return sum(known) / len(known) if known else None
