"""Train stage: pairs -> a LoRA. The latent cache (Ray Data, `artaug.train.latents`), then Ray
Train's TorchTrainer with DeepSpeed inside (`artaug.train.trainer`), into a training output folder
(`artaug.layout.TrainOutput`: latents/, checkpoints/, lora/).

    artaug train --pairs run/round-1/filter --out run/round-1/train

Resumable: a run stopped part-way (killed, failed, cluster lost) and started again with the same
OUT resumes from its latest checkpoint, and reuses a complete latent cache of the same pairs.
"""

from __future__ import annotations

import logging

from artaug.config import RunConfig
from artaug.layout import TrainOutput
from artaug.models.synthesis import check_source
from artaug.stages.contract import reusable_summary, stage
from artaug.train.latents import PairsError, cache_latents, eligible_pairs
from artaug.train.trainer import fit

log = logging.getLogger(__name__)


def _checks(cfg: RunConfig, pairs_dir: str, *_, **__) -> None:
    check_source(cfg.model)
    eligible_pairs(pairs_dir)


@stage("train", resumable=True, checks=_checks)
def train(cfg: RunConfig, pairs_dir: str, stage_dir: str, round_index: int | None = None) -> dict:
    """Train on the eligible pairs of `pairs_dir` into the training output folder `stage_dir`."""
    out = TrainOutput(stage_dir)
    cache = reusable_summary(out.latents)  # None as well for a damaged one: it is built again
    if cache is not None and cache["pairs_source"] == pairs_dir:
        log.info("reusing the latent cache in %s", out.latents)
    else:
        cache = cache_latents(cfg, pairs_dir, out.latents)
    if cache["usable"] == 0:
        raise PairsError(f"no usable pairs in {pairs_dir}: {cache['pairs']} rows, skipped {cache['skipped']}")
    return fit(cfg, out.latents, stage_dir, round_index=round_index)
