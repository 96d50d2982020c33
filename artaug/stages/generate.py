"""Generate stage: prompts -> images, on the FLUX actor pool (`artaug.stages.generator`).

artaug generate --prompts prompts.txt --out out/
"""

from __future__ import annotations

import time

from artaug.config import RunConfig
from artaug.models.synthesis import check_source
from artaug.prompts import PromptSet
from artaug.stages.contract import read_stage, stage
from artaug.stages.generator import generated_images


def _checks(cfg: RunConfig, *_, **__) -> None:
    check_source(cfg.model)


@stage("generate", checks=_checks)
def generate(cfg: RunConfig, prompts: PromptSet, stage_dir: str, round_index: int = 1) -> dict:
    """Generate an image for every prompt into `stage_dir`; returns the summary."""
    start = time.perf_counter()
    generated_images(cfg, prompts, round_index).write_parquet(stage_dir)
    summary = summarize(stage_dir)
    rate = round(summary["images"] / (time.perf_counter() - start), 4)
    return {
        **summary,
        "round": round_index,
        "skipped_blank_prompts": prompts.skipped_blank,
        "prompts_source": prompts.source,
        "images_per_second": rate,
    }


def summarize(stage_dir: str) -> dict:
    """Counts read back from the written Parquet (only the small columns)."""
    table = read_stage(stage_dir, columns=["error", "warning", "seconds"])
    errors = sum(1 for e in table.column("error").to_pylist() if e)
    return {
        "rows": table.num_rows,
        "images": table.num_rows - errors,
        "errors": errors,
        "warnings": sum(1 for w in table.column("warning").to_pylist() if w),
        "generation_seconds": round(sum(table.column("seconds").to_pylist()), 3),
    }
