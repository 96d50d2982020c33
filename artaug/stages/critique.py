"""Critique stage: images -> structured suggestions from the understanding model.

Reads the generate stage's Parquet (or a folder of images), decodes and checks every image first
(a corrupt one becomes an error row before inference), asks the configured critic, then parses and
validates every answer. Every input row yields one output row with status ok, invalid or failed.

    artaug critique --images out/generate --out out/
"""

from __future__ import annotations

import json
import logging
import os
import time

import pyarrow as pa
import ray

from artaug import schema, storage
from artaug.cluster import init_ray
from artaug.config import CritiqueConfig, RunConfig
from artaug.critique.answers import ANSWER, answer_row
from artaug.critique.schema import CritiqueError, has_suggestions, parse_critique, qwen25_resized_size
from artaug.images import BadImageError, data_url, decode_image, fit
from artaug.stages.generate import StageDoneError

log = logging.getLogger(__name__)
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")

PREPARED = pa.schema(
    [
        *(ANSWER.field(name) for name in ("prompt_id", "prompt", "seed", "round")),
        ("image_url", pa.string()),
        *(ANSWER.field(name) for name in ("box_max", "box_scale_w", "box_scale_h")),
        ("error", pa.string()),
    ]
)


class CritiqueInputError(ValueError):
    """The images to critique cannot be found or read; the message names the path."""


def critic_model(cfg: CritiqueConfig) -> str:
    """The model the critic loads: a hub id, a checked local folder, or the built tiny VLM."""
    if cfg.model == "tiny":
        from artaug.models.tiny_vlm import ensure_tiny_vlm

        return ensure_tiny_vlm(cfg.cache_dir)
    local = os.path.expanduser(cfg.model)
    if cfg.model.startswith(("/", "./", "../", "~")) and not os.path.isfile(
        os.path.join(local, "config.json")
    ):
        raise CritiqueInputError(f"critique.model: {local!r} is not a model folder (no config.json)")
    return local if os.path.isdir(local) else cfg.model


def source_rows(path: str) -> ray.data.Dataset:
    """Rows with prompt_id, prompt, seed, round, image, error from a generate output or image folder."""
    for candidate in (path, storage.join(path, "generate")):
        if storage.is_complete(candidate):
            columns = ["prompt_id", "prompt", "seed", "round", "image", "error"]
            return ray.data.read_parquet(candidate, columns=columns, file_extensions=["parquet"])
    if not storage.is_uri(path) and os.path.isdir(path):
        files = sorted(f for f in os.listdir(path) if f.lower().endswith(IMAGE_SUFFIXES))
        if files:
            rows = [
                {"prompt_id": os.path.splitext(f)[0], "prompt": "", "seed": 0, "round": 0,
                 "image": open(os.path.join(path, f), "rb").read(), "error": None}
                for f in files
            ]  # fmt: skip
            return ray.data.from_items(rows, override_num_blocks=min(len(rows), 8))
    raise CritiqueInputError(
        f"{path}: neither a completed generate output (with _SUCCESS) nor a folder of images"
    )


def prepare(batch: pa.Table, cfg: CritiqueConfig) -> pa.Table:
    """Decode, check and downscale each image; a bad one gets an error and no image_url."""
    out = []
    for row in batch.to_pylist():
        prepared = {k: row[k] for k in ("prompt_id", "prompt", "seed", "round")}
        prepared.update(image_url=None, box_max=1000, box_scale_w=1000, box_scale_h=1000, error=None)
        try:
            if row.get("error"):
                raise BadImageError(f"no image: generation failed: {row['error']}")
            image = fit(decode_image(row["image"]), cfg.image_max_side)
        except BadImageError as err:
            prepared["error"] = str(err)
            out.append(prepared)
            continue
        prepared["image_url"] = data_url(image)
        if cfg.box_format == "pixels":
            w, h = qwen25_resized_size(*image.size, cfg.vlm_min_pixels, cfg.vlm_max_pixels)
            prepared.update(box_max=max(w, h), box_scale_w=w, box_scale_h=h)
        out.append(prepared)
    return pa.Table.from_pylist(out, schema=PREPARED)


def heuristic_answers(batch: pa.Table) -> pa.Table:
    from artaug.critique.heuristic import heuristic_critique
    from artaug.images import decode_data_url

    out = []
    for row in batch.to_pylist():
        start = time.perf_counter()
        raw = json.dumps(heuristic_critique(decode_data_url(row["image_url"]), row["prompt"]))
        out.append(answer_row(row, raw, None, time.perf_counter() - start, "heuristic"))
    return pa.Table.from_pylist(out, schema=ANSWER)


def failed_answers(batch: pa.Table) -> pa.Table:
    return pa.Table.from_pylist(
        [answer_row(r, None, r["error"], 0.0, "") for r in batch.to_pylist()], schema=ANSWER
    )


def parse_answers(batch: pa.Table, backend: str, box_format: str) -> pa.Table:
    out = []
    for row in batch.to_pylist():
        result = {k: row[k] for k in ("prompt_id", "prompt", "seed", "round", "raw", "model", "seconds")}
        result.update(backend=backend, critique=None, rating=None, suggestions=None, error=row["error"])
        if row["error"] or row["raw"] is None:
            result["status"] = "failed"
            result["error"] = row["error"] or "no answer"
        else:
            try:
                parsed = parse_critique(row["raw"], box_format, (row["box_scale_w"], row["box_scale_h"]))
            except CritiqueError as err:
                result.update(status="invalid", error=str(err))
            else:
                count = len(parsed["adjustments"]) + len(parsed["regions"]) + bool(parsed["rewritten_prompt"])
                result.update(status="ok", critique=json.dumps(parsed), rating=parsed["rating"],
                              suggestions=count if has_suggestions(parsed) else 0)  # fmt: skip
        out.append(result)
    return pa.Table.from_pylist(out, schema=schema.CRITIQUE)


def ask_critic(ds: ray.data.Dataset, cfg: CritiqueConfig, model: str) -> ray.data.Dataset:
    if cfg.backend == "heuristic":
        return ds.map_batches(heuristic_answers, batch_format="pyarrow", batch_size=cfg.batch_size)
    if cfg.backend == "openai":
        from artaug.critique.openai_backend import OpenAICritic

        return ds.map_batches(
            OpenAICritic,
            fn_constructor_kwargs={"cfg": cfg},
            batch_format="pyarrow",
            batch_size=cfg.batch_size,
            compute=ray.data.ActorPoolStrategy(size=1),
            num_cpus=0.5,
        )
    from artaug.critique.vllm_backend import vllm_critique

    return vllm_critique(ds, cfg, model)


def critique(cfg: RunConfig, images: str, stage_dir: str, overwrite: bool = False) -> dict:
    """Run the stage into `stage_dir` (Parquet + `_SUCCESS`); returns the summary it wrote."""
    c = cfg.critique
    if storage.is_complete(stage_dir) and not overwrite:
        raise StageDoneError(f"{stage_dir} already holds a completed stage (use --overwrite)")
    model = critic_model(c) if c.backend == "vllm" else c.model
    init_ray(cfg.ray, output=stage_dir)
    start = time.perf_counter()
    rows = source_rows(images)
    prepared = rows.map_batches(prepare, fn_kwargs={"cfg": c}, batch_format="pyarrow").materialize()
    good = prepared.filter(lambda row: row["error"] is None)
    bad = prepared.filter(lambda row: row["error"] is not None)
    answers = ask_critic(good, c, model).union(bad.map_batches(failed_answers, batch_format="pyarrow"))
    parsed = answers.map_batches(
        parse_answers, fn_kwargs={"backend": c.backend, "box_format": c.box_format}, batch_format="pyarrow"
    )
    storage.remove_tree(stage_dir)
    parsed.write_parquet(stage_dir)
    summary = summarize(stage_dir) | {
        "stage": "critique",
        "backend": c.backend,
        "model": model,
        "seconds": round(time.perf_counter() - start, 3),
    }
    storage.mark_complete(stage_dir, summary)
    return summary


def summarize(stage_dir: str) -> dict:
    from artaug.stages.generate import read_stage

    table = read_stage(stage_dir, columns=["prompt_id", "status", "suggestions"])
    statuses = table.column("status").to_pylist()
    return {
        "rows": table.num_rows,
        **{status: statuses.count(status) for status in ("ok", "invalid", "failed")},
        "with_suggestions": sum(1 for n in table.column("suggestions").to_pylist() if n),
    }
