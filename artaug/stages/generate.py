"""Generate stage: prompts -> images, on the synthesis hosts (`artaug.stages.generator`).

artaug generate --prompts prompts.txt --out out/

Written in parts (`artaug.stages.parts`): a re-run of a stage stopped part-way generates only the
prompts whose rows are not in a complete part yet (`rows_reused` / `rows_generated` in the summary).
"""

from __future__ import annotations

import dataclasses
import time

from artaug.config import RunConfig
from artaug.models.synthesis import check_source
from artaug.prompts import PromptSet
from artaug.stages import parts
from artaug.stages.contract import read_stage, stage
from artaug.stages.generator import generated_images
from artaug.stages.hosts import Hosts, hosts_for


def _checks(cfg: RunConfig, *_, **__) -> None:
    check_source(cfg.model)


@stage("generate", resumable=True, checks=_checks)
def generate(cfg: RunConfig, prompts: PromptSet, stage_dir: str, round_index: int = 1,
             hosts: Hosts | None = None) -> dict:  # fmt: skip
    """Generate an image for every prompt into `stage_dir` (keeping an earlier attempt's complete
    parts) on the run's warm `hosts` (else hosts of its own); returns the summary."""
    start = time.perf_counter()
    key = parts.fingerprint(cfg.model, cfg.generate, round_index, prompts.rows)
    done = parts.resume(stage_dir, key)
    todo = [row for row in prompts.rows if row["prompt_id"] not in done]
    if todo:
        todo_set = dataclasses.replace(prompts, rows=todo)
        with hosts_for(cfg, hosts) as warm:
            parts.write(generated_images(cfg, todo_set, warm, round_index), stage_dir, key)
    summary = summarize(stage_dir)
    rate = round(len(todo) / (time.perf_counter() - start), 4)
    return {
        **summary,
        "rows_reused": len(prompts.rows) - len(todo),
        "rows_generated": len(todo),
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
