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

import logging
import math
import time
from collections import Counter

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import ray

from artaug import schema, storage
from artaug.cluster import init_ray
from artaug.config import FilterConfig, RunConfig
from artaug.scorers.base import scorer_for_column
from artaug.stages.generate import StageDoneError, read_stage
from artaug.stages.scoring import check_sources, score_images, scored_schema

log = logging.getLogger(__name__)
IMAGES = ("before", "after")
REASONS = ("missing_image", "missing_score", "unchanged", "aesthetic", "alignment", "unsafe")


class FilterInputError(ValueError):
    """The pairs cannot be found or lack the pair columns; the message names the path."""


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
    a, s = cfg.aesthetic, cfg.alignment
    if row.get("image_problem"):
        return False, [f"missing_image: {row['image_problem']}"], None
    absent = [f"{c}_{i}" for c in (a, s) for i in IMAGES if _missing(row.get(f"{c}_{i}"))]
    if absent:
        return False, [f"missing_score: no {', '.join(absent)}"], None
    reasons = []
    if row.get("unchanged") and not cfg.keep_unchanged:
        reasons.append("unchanged: the after image is the before image (no usable suggestion)")
    gain = row[f"{a}_after"] - row[f"{a}_before"]
    if gain < cfg.delta:
        reasons.append(f"aesthetic: {a} gain {gain:+.4f} < delta {cfg.delta:g}")
    if row[f"{s}_after"] < row[f"{s}_before"] - cfg.epsilon:
        reasons.append(
            f"alignment: {s} fell {row[f'{s}_before']:.4f} -> {row[f'{s}_after']:.4f}"
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


def pair_source(path: str) -> str:
    """The folder holding the pairs: PATH itself or PATH/enhance, checked for the pair columns."""
    for candidate in (path, storage.join(path, "enhance")):
        fs, inner = storage.resolve(candidate)
        try:
            dataset = pq.ParquetDataset(inner, filesystem=fs)
        except (FileNotFoundError, OSError, pa.ArrowInvalid):
            continue
        if not dataset.files:
            continue
        missing = [name for name in schema.PAIR.names if name not in dataset.schema.names]
        if missing:
            raise FilterInputError(f"{candidate}: not pair rows (missing columns: {', '.join(missing)})")
        if not storage.is_complete(candidate):
            log.warning("%s has no _SUCCESS marker: the enhance stage may not have finished", candidate)
        return candidate
    raise FilterInputError(f"{path}: no pair Parquet files here or in {storage.join(path, 'enhance')}")


def scorer_names(cfg: FilterConfig) -> list[str]:
    try:
        return list(dict.fromkeys(scorer_for_column(c) for c in (cfg.aesthetic, cfg.alignment)))
    except ValueError as err:
        raise FilterInputError(f"filter.aesthetic/alignment: {err}") from None


def filter_pairs(cfg: RunConfig, pairs: str, stage_dir: str, overwrite: bool = False) -> dict:
    """Run the stage into `stage_dir` (Parquet + `_SUCCESS`); returns the summary it wrote."""
    f = cfg.filter
    names = scorer_names(f)
    safety = cfg.safety if f.safety else None
    check_sources(names, cfg.scorers, safety)
    if storage.is_complete(stage_dir) and not overwrite:
        raise StageDoneError(f"{stage_dir} already holds a completed stage (use --overwrite)")
    source = pair_source(pairs)
    init_ray(cfg.ray, output=stage_dir)
    start = time.perf_counter()
    s = cfg.scorers
    scored = scored_schema(schema.PAIR, names, IMAGES, safety is not None)
    ds = ray.data.read_parquet(source, file_extensions=["parquet"], schema=schema.PAIR)
    ds = score_images(ds.repartition(max(1, 2 * s.num_actors)), s, names, safety, IMAGES, scored)
    ds = ds.map_batches(apply_decisions, fn_kwargs={"cfg": f}, batch_format="pyarrow")
    storage.remove_tree(stage_dir)
    ds.write_parquet(stage_dir)
    summary = summarize(stage_dir, f) | {
        "stage": "filter",
        "pairs_source": source,
        "scorers": names,
        "rule": {
            "aesthetic": f.aesthetic,
            "alignment": f.alignment,
            "delta": f.delta,
            "epsilon": f.epsilon,
            "safety": f.safety,
            "keep_unchanged": f.keep_unchanged,
        },  # fmt: skip
        "seconds": round(time.perf_counter() - start, 3),
    }
    storage.mark_complete(stage_dir, summary)
    return summary


def summarize(stage_dir: str, cfg: FilterConfig) -> dict:
    fs, path = storage.resolve(stage_dir)
    names = pq.ParquetDataset(path, filesystem=fs).schema.names
    rows = read_stage(stage_dir, columns=[c for c in names if c not in IMAGES]).to_pylist()  # no PNGs
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


def read_accepted(stage_dir: str) -> pa.Table:
    """The accepted pairs of a completed filter stage (what training reads)."""
    import pyarrow.compute as pc

    return read_stage(stage_dir).filter(pc.field("accepted"))
