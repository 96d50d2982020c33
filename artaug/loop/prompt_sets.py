"""The prompts of a run: round k's training prompts and the held-out evaluation prompts, from the
user's files or the prompt sets shipped with artaug (`loop.prompt_set`)."""

from __future__ import annotations

import dataclasses
from importlib import resources

from artaug.config import RunConfig
from artaug.prompts import PromptSet, read_prompts

# The prompt sets shipped with artaug (`loop.prompt_set`): (training prompts, held-out prompts), used
# when `prompts` / `loop.eval_prompts` are empty.
SHIPPED_PROMPTS = {
    "demo": ("prompts.txt", "eval_prompts.txt"),
    "train": ("train_prompts.txt", "eval_prompts.txt"),
    "world": ("world_train_prompts.txt", "world_eval_prompts.jsonl"),
}


def train_prompts(cfg: RunConfig, round_index: int = 1) -> PromptSet:
    """Round k's prompts: the first `loop.max_prompts`, or with `loop.new_prompts_each_round` the k-th
    run of `max_prompts` prompts of the file (wrapping around when the file runs out)."""
    limit, shipped = cfg.loop.max_prompts, SHIPPED_PROMPTS[cfg.loop.prompt_set][0]
    if not (limit and cfg.loop.new_prompts_each_round):
        return _prompts(cfg, cfg.prompts, shipped, limit)
    read = _prompts(cfg, cfg.prompts, shipped, limit * round_index)  # reading stops after round k's
    if not read.rows:
        return read
    start = (round_index - 1) * limit % len(read.rows)
    return dataclasses.replace(read, rows=(read.rows[start:] + read.rows[:start])[:limit])


def eval_prompts(cfg: RunConfig) -> PromptSet:
    shipped = SHIPPED_PROMPTS[cfg.loop.prompt_set][1]
    return _prompts(cfg, cfg.loop.eval_prompts, shipped, cfg.loop.eval_max_prompts)


def check_prompts(cfg: RunConfig) -> None:
    """Read the run's prompt files now (bounded), so a bad one is refused before anything is written."""
    train_prompts(cfg, cfg.loop.rounds)  # the last round reads the most
    if cfg.loop.evaluate:
        eval_prompts(cfg)


def _prompts(cfg: RunConfig, path: str, shipped: str, limit: int) -> PromptSet:
    if path:
        return read_prompts(path, limit, cfg.generate)
    with resources.as_file(resources.files("artaug.presets") / shipped) as local:
        return read_prompts(str(local), limit, cfg.generate)
