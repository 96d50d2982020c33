"""What a training worker trains on: the latent cache as tensors, and which rows each micro-batch takes.

Everything random is a function of (seed, phase, step, micro-batch, rank), so a run resumed from a
checkpoint takes exactly the samples an uninterrupted run takes.
"""

from __future__ import annotations

import functools

import numpy as np
import torch

from artaug.train.latents import from_bytes, read_cache


def mix_seed(*parts: int) -> int:
    """A 64-bit seed from integers (numpy's SeedSequence mixes them well)."""
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(1, dtype=np.uint64)[0])


@functools.lru_cache(maxsize=8)
def _permutation(n: int, seed: int) -> list[int]:
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()


def sample_indices(n: int, seed: int, phase: int, step: int, micro: int, rank: int, t) -> list[int]:
    """Cache rows of one micro-batch: consecutive positions in a seeded permutation per epoch."""
    world = t.num_workers
    first = (((step - 1) * t.grad_accumulation + micro) * world + rank) * t.micro_batch_size
    out = []
    for position in range(first, first + t.micro_batch_size):
        epoch, offset = divmod(position, n)
        out.append(_permutation(n, mix_seed(seed, phase, epoch))[offset])
    return out


class CachedPairs:
    """The usable latent-cache rows as tensors, in id order; `subset` (index, count): rows index::count."""

    def __init__(self, cache_dir: str, subset: tuple[int, int] | None = None):
        rows = read_cache(cache_dir).to_pylist()
        if subset is not None:
            rows = rows[subset[0] :: subset[1]]
        if not rows:
            raise ValueError(f"latent cache {cache_dir} holds no usable pair")
        self.latents = {
            side: [from_bytes(r[f"{side}_latent"], r["dtype"], r["latent_shape"]) for r in rows]
            for side in ("before", "after")
        }
        self.prompt_embeds = [from_bytes(r["prompt_embeds"], r["dtype"], r["text_shape"]) for r in rows]
        self.pooled = [from_bytes(r["pooled_embeds"], r["dtype"], [-1]) for r in rows]

    def __len__(self) -> int:
        return len(self.prompt_embeds)
