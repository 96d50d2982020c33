"""Critique stage: images -> structured suggestions from the understanding model.

Reads the generate stage's rows (or a folder of images), decodes and checks every image first (a
corrupt one becomes an error row before inference), asks the critic (`artaug.critic.backends`),
then parses and validates every answer. Every input row yields one output row with status ok,
invalid or failed. In the loop it can start on the first generated images: it follows the generate
stage's parts while they are written (`artaug.stages.parts.follow`).

    artaug critique --images out/generate --out out/
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable
from contextlib import AbstractContextManager

import pyarrow as pa
import pyarrow.compute as pc
import ray

from artaug import storage
from artaug.config import CritiqueConfig, RunConfig
from artaug.critic.answers import (
    REQUEST,
    CriticFailedError,
    check_failures,
    failed_answers,
    read_answer,
    request_for,
)
from artaug.critic.backends import MODEL_FREE, ask, critic_model, critique_task, model_free_answers
from artaug.critic.openai_backend import Endpoint
from artaug.images import BadImageError, decode_image
from artaug.rows import CRITIQUE
from artaug.stages import inputs, parts
from artaug.stages.contract import read_stage, stage

_IDS = ("prompt_id", "prompt", "seed", "round")


def source_rows(path: str) -> ray.data.Dataset:
    """Rows with prompt_id, prompt, seed, round, image, error from a generate output or image folder."""
    folder = inputs.images_to_critique(path)
    if folder is not None:
        return ray.data.read_parquet(folder, columns=list(inputs.CRITIQUED), file_extensions=["parquet"])
    rows = []
    for name in sorted(f for f in os.listdir(path) if f.lower().endswith(inputs.IMAGE_SUFFIXES)):
        with open(os.path.join(path, name), "rb") as f:
            rows.append({"prompt_id": os.path.splitext(name)[0], "prompt": "", "seed": 0, "round": 0,
                         "image": f.read(), "error": None})  # fmt: skip
    return ray.data.from_items(rows, override_num_blocks=min(len(rows), 8))


def prepare(batch: pa.Table, cfg: CritiqueConfig) -> pa.Table:
    """Decode, check and downscale each image; a bad one gets an error and no image_url."""
    out = []
    for row in batch.to_pylist():
        try:
            if row.get("error"):
                raise BadImageError(f"no image: generation failed: {row['error']}")
            out.append(request_for(row, decode_image(row["image"]), cfg))
        except BadImageError as err:
            out.append({**{k: row[k] for k in _IDS}, "image_url": None, "box_max": 1000, "box_scale_w": 1000,
                        "box_scale_h": 1000, "error": str(err)})  # fmt: skip
    return pa.Table.from_pylist(out, schema=REQUEST)


def parse_answers(batch: pa.Table, backend: str, box_format: str) -> pa.Table:
    out = []
    for row in batch.to_pylist():
        result = {k: row[k] for k in (*_IDS, "raw", "model", "seconds")}
        out.append({**result, "backend": backend, **read_answer(row, box_format)})
    return pa.Table.from_pylist(out, schema=CRITIQUE)


def critique_without_model(batch: pa.Table, cfg: CritiqueConfig) -> pa.Table:
    """Prepare, answer and parse one batch in one task: a critic with no model (critique.backend in
    MODEL_FREE) needs no separate ask, so the stage runs one Ray Data execution, not three."""
    requests = prepare(batch, cfg)
    usable = pc.is_null(requests.column("error"))
    answers = pa.concat_tables([
        model_free_answers(requests.filter(usable), cfg.backend),
        failed_answers(requests.filter(pc.invert(usable))),
    ])  # fmt: skip
    return parse_answers(answers, cfg.backend, cfg.box_format)


def _checks(cfg: RunConfig, images: str, *_, writer: parts.Writer | None = None, **__) -> None:
    if cfg.critique.backend == "vllm":
        critic_model(cfg.critique)
    if writer is None:  # else the generate stage is still being written: `parts.follow` checks it
        inputs.images_to_critique(images)


@stage("critique", checks=_checks)
def critique(cfg: RunConfig, images: str, stage_dir: str, endpoint: Endpoint | None = None,
             writer: parts.Writer | None = None,
             asking: Callable[[], AbstractContextManager] = contextlib.nullcontext) -> dict:  # fmt: skip
    """Critique the images at `images` into `stage_dir`; returns the summary.

    `endpoint`: a warm engine to ask instead of starting the configured backend's own (the run's
    engine, OpenAI protocol). `writer`: the thread writing the generate stage `images`; its parts are
    critiqued as they become whole (`parts.follow`). `asking`: a context around each batch's
    requests (the loop counts its engine's busy time with it). Fails, and removes the rows it wrote,
    when the critic failed on more than critique.max_failed_fraction of the images."""
    critic = cfg.critique
    model = critic_model(critic) if critic.backend == "vllm" else critic.model
    if writer is None:
        sources = [source_rows(images)]
    else:
        columns = list(inputs.CRITIQUED)
        sources = (ray.data.read_parquet(files, columns=columns) for files in parts.follow(images, writer))
    key, errors, batches = parts.fingerprint(critic, model, images), [], 0
    for rows in sources:
        with asking():
            errors += _critique_rows(rows, cfg, model, endpoint, stage_dir, key)
        batches += 1
    try:
        check_failures("critique", errors, critic.max_failed_fraction)
    except CriticFailedError:
        storage.remove_tree(stage_dir)
        raise
    table = read_stage(stage_dir, columns=["status", "suggestions"])
    statuses = table.column("status").to_pylist()
    return {
        "rows": table.num_rows,
        **{status: statuses.count(status) for status in ("ok", "invalid", "failed")},
        "with_suggestions": sum(1 for n in table.column("suggestions").to_pylist() if n),
        "backend": cfg.critique.backend,
        "engine": endpoint and endpoint.url,
        "model": model,
        "input_batches": batches,
    }


def _critique_rows(rows: ray.data.Dataset, cfg: RunConfig, model: str, endpoint: Endpoint | None,
                   stage_dir: str, key: str) -> list[str | None]:  # fmt: skip
    """Critique one batch of input rows into parts of `stage_dir`; returns the critic's errors (one
    per image it was asked about) for the stage's failed-fraction rule."""
    critic = cfg.critique
    if endpoint is None and critic.backend in MODEL_FREE:
        critiqued = rows.map_batches(
            critique_without_model, fn_kwargs={"cfg": critic}, batch_format="pyarrow"
        )
        parts.write(critiqued, stage_dir, key)
        return []  # such a critic answers every image or raises: no per-row failures to count
    prepared = rows.map_batches(prepare, fn_kwargs={"cfg": critic}, batch_format="pyarrow").materialize()
    good = prepared.filter(lambda row: row["error"] is None)
    bad = prepared.filter(lambda row: row["error"] is not None)
    answers = ask(good, critic, critique_task(critic.box_format), model, endpoint).materialize()
    errors = [row["error"] for row in answers.select_columns(["error"]).iter_rows()]
    answers = answers.union(bad.map_batches(failed_answers, batch_format="pyarrow"))
    parsed = answers.map_batches(
        parse_answers,
        fn_kwargs={"backend": critic.backend, "box_format": critic.box_format},
        batch_format="pyarrow",
    )
    parts.write(parsed, stage_dir, key)
    return errors
