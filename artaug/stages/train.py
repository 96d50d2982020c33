"""Train stage: pairs -> a LoRA. The latent cache (Ray Data on the warm synthesis hosts,
`artaug.train.latents`), then Ray Train's TorchTrainer with DeepSpeed inside (`artaug.train.trainer`),
into a training output folder (`artaug.layout.TrainOutput`: latents/, checkpoints/, lora/).

    artaug train --pairs run/round-1/filter --out run/round-1/train

Resumable: a run stopped part-way (killed, failed, cluster lost) and started again with the same
OUT resumes from its latest checkpoint, and reuses a complete latent cache of the same pairs.
"""

from __future__ import annotations

import logging

from artaug.config import RunConfig
from artaug.layout import TrainOutput
from artaug.models.synthesis import check_source
from artaug.stages import parts
from artaug.stages.contract import reusable_summary, stage
from artaug.stages.hosts import Hosts, hosts_for, hosts_hold_gpus, map_on_hosts
from artaug.train.latents import cache_latents
from artaug.train.pairs import PairsError, eligible_pairs
from artaug.train.trainer import fit

log = logging.getLogger(__name__)


def _checks(cfg: RunConfig, pairs_dir: str, *_, **__) -> None:
    check_source(cfg.model)
    eligible_pairs(pairs_dir)


def encode_pairs(cfg: RunConfig, pairs_dir: str, cache_dir: str, hosts: Hosts | None = None,
                 writer: parts.Writer | None = None) -> dict:  # fmt: skip
    """The latent cache of `pairs_dir`, encoded on the synthesis `hosts` (else on hosts of its own);
    `writer`: the filter stage writing `pairs_dir` now, whose parts are encoded as they land."""
    arriving = parts.follow(pairs_dir, writer) if writer is not None else None
    with hosts_for(cfg, hosts) as warm:
        encode = lambda ds, *work: map_on_hosts(ds, warm.pool("synthesis"), *work)  # noqa: E731
        return cache_latents(cfg, pairs_dir, cache_dir, encode, arriving)


@stage("train", resumable=True, checks=_checks)
def train(cfg: RunConfig, pairs_dir: str, stage_dir: str, round_index: int | None = None,
          hosts: Hosts | None = None) -> dict:  # fmt: skip
    """Train on the eligible pairs of `pairs_dir` into the training output folder `stage_dir`; the
    latent cache is encoded on the run's warm synthesis `hosts` (else on hosts of its own)."""
    out = TrainOutput(stage_dir)
    cache = reusable_summary(out.latents)  # None as well for a damaged one: it is built again
    if cache is not None and cache["pairs_source"] == pairs_dir:
        log.info("reusing the latent cache in %s", out.latents)
    else:
        cache = encode_pairs(cfg, pairs_dir, out.latents, hosts)
    if hosts is not None and hosts_hold_gpus(cfg):  # training needs their GPUs (architecture.md, Warm hosts)
        hosts.release()
    if cache["usable"] == 0:
        raise PairsError(f"no usable pairs in {pairs_dir}: {cache['pairs']} rows, skipped {cache['skipped']}")
    return fit(cfg, out.latents, stage_dir, round_index=round_index)
