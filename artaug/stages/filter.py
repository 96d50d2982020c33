"""Filter stage: keep the pairs whose enhanced image is really better, still faithful, and safe.

A pair is accepted when
    aesthetic(after) - aesthetic(before) >= filter.delta,
    alignment(after) >= alignment(before) - filter.epsilon,
    the after image passes the safety checker (when filter.safety),
and, unless filter.keep_unchanged, the after image differs from the before image. Every pair keeps
its scores and the reasons it was rejected; pairs with a missing or corrupt image are rejected,
counted and reported. The summary in `_SUCCESS` has acceptance counts and score statistics.

    artaug filter --pairs out/round-1/enhance --out out/round-1
"""

from __future__ import annotations

import math
from collections import Counter

import numpy as np
import pyarrow as pa
import ray

from artaug.config import FilterConfig, RunConfig
from artaug.rows import PAIR
from artaug.scorers.base import scorers_for_columns
from artaug.stages import inputs, parts
from artaug.stages.contract import StageInputError, read_stage, stage
from artaug.stages.hosts import Hosts, hosts_for
from artaug.stages.scoring import check_sources, score_images, scored_schema

IMAGES = ("before", "after")
REASONS = ("missing_image", "missing_score", "unchanged", "aesthetic", "alignment", "unsafe")


def decision_schema(scored: pa.Schema) -> pa.Schema:
    return pa.schema(
        [
            *scored,
            ("aesthetic_delta", pa.float64()),
            ("accepted", pa.bool_()),
            ("reject_reasons", pa.list_(pa.string())),
        ]
    )


def decide(row: dict, cfg: FilterConfig) -> tuple[bool, list[str], float | None]:
    """(accepted, reasons, aesthetic gain) for one scored pair row."""
    aesthetic, alignment = cfg.aesthetic, cfg.alignment
    if row.get("image_problem"):
        return False, [f"missing_image: {row['image_problem']}"], None
    absent = [f"{c}_{i}" for c in (aesthetic, alignment) for i in IMAGES if _missing(row.get(f"{c}_{i}"))]
    if absent:
        return False, [f"missing_score: no {', '.join(absent)}"], None
    reasons = []
    if row.get("unchanged") and not cfg.keep_unchanged:
        reasons.append("unchanged: the after image is the before image (no usable suggestion)")
    gain = row[f"{aesthetic}_after"] - row[f"{aesthetic}_before"]
    if gain < cfg.delta:
        reasons.append(f"aesthetic: {aesthetic} gain {gain:+.4f} < delta {cfg.delta:g}")
    if row[f"{alignment}_after"] < row[f"{alignment}_before"] - cfg.epsilon:
        reasons.append(
            f"alignment: {alignment} fell {row[f'{alignment}_before']:.4f} -> {row[f'{alignment}_after']:.4f}"
            f" (more than epsilon {cfg.epsilon:g})"
        )
    if cfg.safety and row.get("unsafe_after") is not False:
        concept = row.get("unsafe_concept_after")
        margin = row.get("safety_margin_after")
        detail = f"close to {concept!r} (margin {margin:+.4f})" if concept is not None else "not checked"
        reasons.append(f"unsafe: after image {detail}")
    return not reasons, reasons, gain


def _missing(value) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def apply_decisions(batch: pa.Table, cfg: FilterConfig) -> pa.Table:
    rows = batch.to_pylist()
    for row in rows:
        row["accepted"], row["reject_reasons"], row["aesthetic_delta"] = decide(row, cfg)
    return pa.Table.from_pylist(rows, schema=decision_schema(batch.schema))


def scorer_names(cfg: FilterConfig) -> list[str]:
    try:
        return scorers_for_columns([cfg.aesthetic, cfg.alignment])
    except ValueError as err:
        raise StageInputError(f"filter.aesthetic/alignment: {err}") from None


def _checks(cfg: RunConfig, pairs: str, *_, **__) -> None:
    check_sources(scorer_names(cfg.filter), cfg.scorers, cfg.safety if cfg.filter.safety else None)
    inputs.pairs(pairs)


@stage("filter", checks=_checks)
def filter_pairs(cfg: RunConfig, pairs: str, stage_dir: str, hosts: Hosts | None = None) -> dict:
    """Score and judge the pairs at `pairs` (PATH or PATH/enhance) into `stage_dir` on the run's warm
    scorer `hosts` (else hosts of its own); returns the summary."""
    rule, scorers = cfg.filter, cfg.scorers
    names = scorer_names(rule)
    safety = cfg.safety if rule.safety else None
    source = inputs.pairs(pairs)
    scored = scored_schema(PAIR, names, IMAGES, safety is not None)
    ds = ray.data.read_parquet(source, file_extensions=["parquet"], schema=PAIR)
    ds = ds.repartition(max(1, 2 * scorers.num_actors))
    with hosts_for(cfg, hosts) as warm:
        ds = score_images(ds, warm, scorers, names, safety, IMAGES, scored)
        decided = ds.map_batches(apply_decisions, fn_kwargs={"cfg": rule}, batch_format="pyarrow")
        # In parts, each whole before it is recorded: the loop's latent cache encodes them as they land.
        parts.write(decided, stage_dir, parts.fingerprint(cfg.model, cfg.filter, cfg.scorers, source))
    fields = ("aesthetic", "alignment", "delta", "epsilon", "safety", "keep_unchanged")
    return {**summarize(stage_dir, rule), "pairs_source": source, "scorers": names,
            "rule": {k: getattr(rule, k) for k in fields}}  # fmt: skip


def summarize(stage_dir: str, cfg: FilterConfig) -> dict:
    rows = read_stage(stage_dir, exclude=IMAGES).to_pylist()
    reasons = Counter(r.split(":", 1)[0] for row in rows for r in row["reject_reasons"])
    accepted = sum(row["accepted"] for row in rows)
    missing_ids = [
        row["prompt_id"] for row in rows if any(r.startswith("missing_image") for r in row["reject_reasons"])
    ]
    scores = {}
    for column in dict.fromkeys((cfg.aesthetic, cfg.alignment)):
        for image in IMAGES:
            scores[f"{column}_{image}"] = _stats([row[f"{column}_{image}"] for row in rows])
    scores["aesthetic_delta"] = _stats([row["aesthetic_delta"] for row in rows])
    scores["aesthetic_delta_accepted"] = _stats([row["aesthetic_delta"] for row in rows if row["accepted"]])
    return {
        "rows": len(rows),
        "accepted": accepted,
        "rejected": len(rows) - accepted,
        "acceptance_rate": round(accepted / len(rows), 4) if rows else None,
        "mean_aesthetic_gain": scores["aesthetic_delta"].get("mean"),  # over all scored pairs
        "missing_images": len(missing_ids),
        "missing_image_ids": missing_ids[:50],
        "unsafe_after": sum(1 for row in rows if row.get("unsafe_after")),
        "reject_reasons": {reason: reasons.get(reason, 0) for reason in REASONS},
        "scores": scores,
    }


def _stats(values: list) -> dict:
    data = np.array([v for v in values if not _missing(v)], dtype=np.float64)
    if not data.size:
        return {"n": 0}
    q = np.percentile(data, [10, 50, 90])
    return {"n": int(data.size), "mean": round(float(data.mean()), 6), "std": round(float(data.std()), 6),
            "min": round(float(data.min()), 6), "p10": round(float(q[0]), 6), "median": round(float(q[1]), 6),
            "p90": round(float(q[2]), 6), "max": round(float(data.max()), 6)}  # fmt: skip
