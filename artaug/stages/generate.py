"""Generate stage: prompts -> images, as a Ray Data actor pool with one pipeline per actor.

Each actor loads the synthesis model once and generates batches of rows that share settings with our
sampling loop (`artaug.flux_loop`, identical to diffusers' FluxPipeline), one torch.Generator per
row, so a row's image depends only on its own prompt, seed and settings.
A row whose generation raises becomes an error row; the others finish.

    artaug generate --prompts prompts.txt --out out/
"""

from __future__ import annotations

import logging
import time

import pyarrow as pa
import pyarrow.parquet as pq
import ray
import torch

from artaug import schema, storage
from artaug.cluster import cluster_has_gpus, init_ray, label_selector
from artaug.config import RunConfig
from artaug.flux_loop import Job, sample
from artaug.images import png_bytes
from artaug.models.synthesis import check_source, load_pipeline
from artaug.prompts import PER_ROW_SETTINGS, PromptSet
from artaug.stages.batching import run_in_groups

log = logging.getLogger(__name__)


class StageDoneError(FileExistsError):
    """The output folder already holds a completed stage and overwriting was not asked for."""


class FluxGenerator:
    """Ray Data actor: holds one pipeline and turns batches of prompt rows into image rows."""

    def __init__(self, cfg: RunConfig, round_index: int = 1):
        torch.set_num_threads(cfg.generate.torch_threads)
        self.cfg = cfg
        self.round_index = round_index
        self.pipe = load_pipeline(cfg.model)

    def __call__(self, batch: pa.Table) -> pa.Table:
        rows = [self._settle(row) for row in batch.to_pylist()]
        done = run_in_groups([row for row in rows if not row["error"]], self._run)
        ordered = [done.get(row["prompt_id"], row) for row in rows]
        return pa.Table.from_pylist(ordered, schema=schema.GENERATE)

    def _settle(self, row: dict) -> dict:
        """The row's effective settings (its own, else the config's), checked."""
        g = self.cfg.generate
        settled = {
            "prompt_id": row["prompt_id"],
            "prompt": row["prompt"],
            "round": self.round_index,
            "seed": g.seed + row["index"] if row.get("seed") is None else row["seed"],
            "width": row.get("width") or g.width,
            "height": row.get("height") or g.height,
            "steps": row.get("steps") or g.steps,
            "guidance": g.guidance if row.get("guidance") is None else row["guidance"],
            "image": None,
            "error": None,
            "warning": None,
            "seconds": 0.0,
        }
        settled["error"] = _row_problem(settled, g.max_side)
        return settled

    def _run(self, rows: list[dict]) -> list[dict]:
        first = rows[0]
        start = time.perf_counter()
        images = sample(
            self.pipe,
            [Job(row["prompt"], row["seed"]) for row in rows],
            width=first["width"],
            height=first["height"],
            steps=first["steps"],
            guidance=first["guidance"],
            max_sequence_length=self.cfg.model.max_sequence_length,
        )
        share = (time.perf_counter() - start) / len(rows)
        return [
            {**row, "image": png_bytes(image), "seconds": share, "warning": self._truncation(row)}
            for row, image in zip(rows, images, strict=True)
        ]

    def _truncation(self, row: dict) -> str | None:
        """A warning when the prompt exceeds what either text encoder reads."""
        notes = []
        limits = (
            ("CLIP", self.pipe.tokenizer, self.pipe.tokenizer.model_max_length),
            ("T5", self.pipe.tokenizer_2, self.cfg.model.max_sequence_length),
        )
        for name, tokenizer, limit in limits:
            count = len(tokenizer(row["prompt"], truncation=False).input_ids)
            if count > limit:
                notes.append(f"{name} {count} tokens > {limit}")
        if not notes:
            return None
        log.warning("prompt %s truncated: %s", row["prompt_id"], "; ".join(notes))
        return "prompt truncated: " + "; ".join(notes)


def _row_problem(row: dict, max_side: int) -> str | None:
    for side in ("width", "height"):
        value = row[side]
        if not isinstance(value, int) or value <= 0 or value % 16:
            return f"{side} {value!r} is not a positive multiple of 16"
        if value > max_side:
            return f"{side} {value} is above generate.max_side ({max_side})"
    if row["steps"] < 1:
        return f"steps {row['steps']} must be >= 1"
    if not 0 <= row["seed"] < 2**63:
        return f"seed {row['seed']} must be in [0, 2**63)"
    return None


def _as_rows(prompts: PromptSet) -> list[dict]:
    """Uniform rows (every column present) so Ray infers one schema for all blocks."""
    columns = ("prompt_id", "prompt", "index", *PER_ROW_SETTINGS)
    return [{c: row.get(c) for c in columns} for row in prompts.rows]


def generate(
    cfg: RunConfig,
    prompts: PromptSet,
    stage_dir: str,
    round_index: int = 1,
    overwrite: bool = False,
) -> dict:
    """Run the stage into `stage_dir` (Parquet + `_SUCCESS`); returns the summary it wrote.

    A completed stage_dir is refused unless `overwrite`; a half-written one is cleared and redone.
    """
    check_source(cfg.model)
    if storage.is_complete(stage_dir) and not overwrite:
        raise StageDoneError(f"{stage_dir} already holds a completed stage (use --overwrite)")
    storage.remove_tree(stage_dir)
    init_ray(cfg.ray, output=stage_dir)
    g = cfg.generate
    gpus = g.gpus_per_actor if g.gpus_per_actor >= 0 else (1.0 if cluster_has_gpus() else 0.0)
    rows = _as_rows(prompts)
    blocks = min(len(rows), g.blocks or 4 * g.num_actors)
    start = time.perf_counter()
    ds = ray.data.from_items(rows, override_num_blocks=blocks).map_batches(
        FluxGenerator,
        fn_constructor_kwargs={"cfg": cfg, "round_index": round_index},
        batch_size=g.batch_size,
        batch_format="pyarrow",
        compute=ray.data.ActorPoolStrategy(size=g.num_actors),
        num_gpus=gpus,
        num_cpus=g.cpus_per_actor,
        label_selector=label_selector(g.node_labels),
    )
    ds.write_parquet(stage_dir)
    seconds = time.perf_counter() - start
    summary = summarize(stage_dir) | {
        "stage": "generate",
        "round": round_index,
        "seconds": round(seconds, 3),
        "skipped_blank_prompts": prompts.skipped_blank,
        "prompts_source": prompts.source,
    }
    summary["images_per_second"] = round(summary["images"] / seconds, 4) if seconds else None
    storage.mark_complete(stage_dir, summary)
    return summary


def summarize(stage_dir: str) -> dict:
    """Counts read back from the written Parquet (only the small columns)."""
    table = read_stage(stage_dir, columns=["prompt_id", "error", "warning", "seconds"])
    errors = [e for e in table.column("error").to_pylist() if e]
    warnings = [w for w in table.column("warning").to_pylist() if w]
    return {
        "rows": table.num_rows,
        "images": table.num_rows - len(errors),
        "errors": len(errors),
        "warnings": len(warnings),
        "generation_seconds": round(sum(table.column("seconds").to_pylist()), 3),
    }


def read_stage(stage_dir: str, columns: list[str] | None = None) -> pa.Table:
    """All Parquet rows of a stage folder, sorted by prompt_id."""
    fs, path = storage.resolve(stage_dir)
    table = pq.read_table(path, filesystem=fs, columns=columns)
    return table.sort_by("prompt_id")
