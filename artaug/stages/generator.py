"""FLUX on the warm synthesis hosts: prompt rows into image rows (the generate stage's transformation,
also the evaluation's generations with the base and the enhanced model).

Batches of rows that share settings go through our sampling loop (`artaug.models.sampling`,
identical to diffusers' FluxPipeline), one torch.Generator per row, so a row's image depends only on
its own prompt, seed and settings. A row whose generation raises becomes an error row; the others
finish.
"""

from __future__ import annotations

import logging
import math
import time

import pyarrow as pa
import ray

from artaug.config import RunConfig
from artaug.images import png_bytes
from artaug.models.sampling import Job, sample
from artaug.models.synthesis import check_source, host_pipeline
from artaug.prompts import PER_ROW_SETTINGS, PromptSet
from artaug.rows import GENERATE
from artaug.stages.batching import run_in_groups
from artaug.stages.hosts import Hosts, ModelHost, map_on_hosts

log = logging.getLogger(__name__)


class FluxGenerator:
    """Work class for a synthesis host (or alone, loading its own pipeline): prompt rows to image rows."""

    def __init__(self, cfg: RunConfig, round_index: int = 1, host: ModelHost | None = None):
        self.cfg = cfg
        self.round_index = round_index
        self.pipe = host_pipeline(host, cfg.model)

    def __call__(self, batch: pa.Table) -> pa.Table:
        rows = [self._settle(row) for row in batch.to_pylist()]
        done = run_in_groups([row for row in rows if not row["error"]], self._run)
        ordered = [done.get(row["prompt_id"], row) for row in rows]
        return pa.Table.from_pylist(ordered, schema=GENERATE)

    def _settle(self, row: dict) -> dict:
        """The row's effective settings (its own, else the config's), checked."""
        settled = {
            "prompt_id": row["prompt_id"],
            "prompt": row["prompt"],
            "round": self.round_index,
            "seed": self.cfg.generate.seed + row["index"] if row.get("seed") is None else row["seed"],
            "width": row.get("width") or self.cfg.generate.width,
            "height": row.get("height") or self.cfg.generate.height,
            "steps": row.get("steps") or self.cfg.generate.steps,
            "guidance": self.cfg.generate.guidance if row.get("guidance") is None else row["guidance"],
            "image": None,
            "error": None,
            "warning": None,
            "seconds": 0.0,
        }
        settled["error"] = _row_problem(settled, self.cfg.generate.max_side)
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


def prompt_blocks(rows: int, generate) -> int:
    """Ray Data blocks for `rows` prompts: generate.blocks, else 4 per synthesis host, or more where a
    block would hold more than generate.block_rows prompts (a block's images are stored together)."""
    default = max(4 * generate.num_actors, math.ceil(rows / generate.block_rows))
    return min(rows, generate.blocks or default)


def generated_images(
    cfg: RunConfig, prompts: PromptSet, hosts: Hosts, round_index: int = 1
) -> ray.data.Dataset:
    """The image rows (rows.GENERATE) of `prompts` with the model of cfg.model, as a lazy dataset
    computed on the synthesis hosts."""
    check_source(cfg.model)
    columns = ("prompt_id", "prompt", "index", *PER_ROW_SETTINGS)
    rows = [{c: row.get(c) for c in columns} for row in prompts.rows]  # uniform: one schema for all blocks
    return map_on_hosts(
        ray.data.from_items(rows, override_num_blocks=prompt_blocks(len(rows), cfg.generate)),
        hosts.pool("synthesis"),
        FluxGenerator,
        {"cfg": cfg, "round_index": round_index},
        cfg.generate.batch_size,
    )
