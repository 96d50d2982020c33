"""Our FLUX sampling loop over diffusers components, with ArtAug's regional composition.

Without regions it computes exactly what diffusers' FluxPipeline computes (same latents from the
same generators, same timesteps and shift, same transformer calls), so images are byte-identical.
With regions, every step evaluates the global prompt and each regional prompt of an image in one
batched transformer forward and composes the velocity predictions under the regions' masks:

    v = (v(P) + sum_i s_i * M_i * v(P_i)) / (1 + sum_i s_i * M_i)

M_i is the region's box on FLUX's packed latent token grid (one token per 16x16 pixels), either as
the fraction of each token's cell the box covers or binarised, then Gaussian-blurred; s_i is the mask
scale. Cost: 1 + R transformer evaluations per step for an image with R regions.

The authors' regional code (DiffSynth-Studio, diffsynth/pipelines/base.py `merge_latents`, commit
32a7a1487df8c1aac81729711f5256fbba0582ce) composes with the same formula; it binarises the mask and
blurs it on the unpacked 1/8 latent grid, see docs/method.md for every difference.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from diffusers.pipelines.flux.pipeline_flux import calculate_shift, retrieve_timesteps

TOKEN_PIXELS = 16  # the VAE's 8x downsampling, then FLUX packs 2x2 latent patches into one token
Coverage = Literal["fraction", "binary"]


class Cancelled(RuntimeError):
    """should_stop() asked the loop to stop between two steps."""


@dataclass
class Region:
    box: tuple[float, float, float, float]
    """x0, y0, x1, y1 as fractions of the image width and height."""
    prompt: str
    """What this region should show."""
    scale: float = 1.0
    """s_i: how strongly the regional prediction counts under its mask."""


@dataclass
class Job:
    """One image to sample: its prompt, seed and the regions to compose (none for plain generation)."""

    prompt: str
    seed: int
    regions: list[Region] = field(default_factory=list)


def region_mask(
    box,
    width: int,
    height: int,
    blur_kernel: int = 5,
    blur_sigma: float = 1.0,
    coverage: Coverage = "fraction",
) -> torch.Tensor:
    """The box as a (tokens,) mask in [0, 1] on the packed token grid, row-major like FLUX's packing.

    coverage "fraction": each token gets the fraction of its 16x16 cell that the box covers;
    "binary": 1 inside the box with its edges snapped to the nearest token edge (a token is in when
    the box covers at least half of it along each axis; at least the token holding the box's centre).
    Then a Gaussian blur (in tokens; kernel 1 or sigma 0 means none) softens the edges. Edge cells are
    padded by replication so a box touching the border stays at full strength there.
    """
    x0, y0, x1, y1 = (float(v) for v in box)
    if not (0 <= x0 < x1 <= 1 and 0 <= y0 < y1 <= 1):
        raise ValueError(
            f"region box {list(box)} is empty or outside the image (need 0<=x0<x1<=1, 0<=y0<y1<=1)"
        )
    rows, cols = height // TOKEN_PIXELS, width // TOKEN_PIXELS
    if coverage == "binary":
        cover_y, cover_x = _snapped(y0, y1, rows), _snapped(x0, x1, cols)
    else:
        cover_y, cover_x = _covered(y0, y1, rows), _covered(x0, x1, cols)
    mask = torch.from_numpy(np.outer(cover_y, cover_x)).float()[None, None]
    if blur_kernel > 1 and blur_sigma > 0:
        offsets = torch.arange(blur_kernel, dtype=torch.float32) - (blur_kernel - 1) / 2
        weights = torch.exp(-(offsets**2) / (2 * blur_sigma**2))
        weights /= weights.sum()
        pad = blur_kernel // 2
        mask = F.pad(mask, (pad, pad, pad, pad), mode="replicate")
        mask = F.conv2d(mask, weights.view(1, 1, 1, -1))
        mask = F.conv2d(mask, weights.view(1, 1, -1, 1))
    return mask.clamp(0, 1).flatten()


def _covered(lo: float, hi: float, cells: int) -> np.ndarray:
    """Per cell along one axis: the fraction of it that [lo, hi] covers."""
    edges = np.arange(cells + 1) / cells
    return np.clip(np.minimum(edges[1:], hi) - np.maximum(edges[:-1], lo), 0, None) * cells


def _snapped(lo: float, hi: float, cells: int) -> np.ndarray:
    """Per cell along one axis: 1 between [lo, hi]'s edges rounded to the nearest cell edge, else 0."""
    start, end = int(np.floor(lo * cells + 0.5)), int(np.floor(hi * cells + 0.5))
    if end <= start:  # a box thinner than half a cell keeps the cell holding its centre
        start = min(int((lo + hi) / 2 * cells), cells - 1)
        end = start + 1
    out = np.zeros(cells)
    out[start:end] = 1.0
    return out


def compose(global_v: torch.Tensor, region_v: torch.Tensor, masks: torch.Tensor, owners: torch.Tensor):
    """(B,S,C) global predictions, (N,S,C) regional ones with (N,S) scaled masks and the (N,) image each
    region belongs to -> (B,S,C): (v + sum s M v_i) / (1 + sum s M)."""
    if region_v.shape[0] == 0:
        return global_v
    weights = masks.unsqueeze(-1).to(global_v.dtype)
    numerator = global_v.index_add(0, owners, weights * region_v)
    denominator = torch.ones_like(global_v[..., :1]).index_add(0, owners, weights)
    return numerator / denominator


@torch.inference_mode()
def sample(
    pipe,
    jobs: list[Job],
    width: int,
    height: int,
    steps: int,
    guidance: float,
    max_sequence_length: int = 512,
    blur_kernel: int = 5,
    blur_sigma: float = 1.0,
    coverage: Coverage = "fraction",
    should_stop: Callable[[], bool] | None = None,
):
    """Images (PIL) for jobs that share size, steps and guidance; one generator per job."""
    device = pipe.transformer.device
    regions = [(i, r) for i, job in enumerate(jobs) for r in job.regions]
    prompts = [job.prompt for job in jobs] + [r.prompt for _, r in regions]
    embeds, pooled, text_ids = pipe.encode_prompt(
        prompt=prompts, prompt_2=None, device=device, max_sequence_length=max_sequence_length
    )
    generators = [torch.Generator("cpu").manual_seed(job.seed) for job in jobs]
    channels = pipe.transformer.config.in_channels // 4
    latents, image_ids = pipe.prepare_latents(
        len(jobs), channels, height, width, embeds.dtype, device, generators
    )
    owners = torch.tensor([i for i, _ in regions], dtype=torch.long, device=device)
    masks = torch.zeros(len(regions), latents.shape[1], device=device)
    for n, (_, region) in enumerate(regions):
        masks[n] = region.scale * region_mask(
            region.box, width, height, blur_kernel, blur_sigma, coverage
        ).to(device)
    sigmas = np.linspace(1.0, 1 / steps, steps)
    config = pipe.scheduler.config
    mu = calculate_shift(
        latents.shape[1],
        config.get("base_image_seq_len", 256),
        config.get("max_image_seq_len", 4096),
        config.get("base_shift", 0.5),
        config.get("max_shift", 1.15),
    )
    timesteps, _ = retrieve_timesteps(pipe.scheduler, steps, device, sigmas=sigmas, mu=mu)
    pipe.scheduler.set_begin_index(0)
    rows = torch.cat([torch.arange(len(jobs), device=device), owners])
    guidance_vector = None
    if pipe.transformer.config.guidance_embeds:
        guidance_vector = torch.full([1], guidance, device=device, dtype=torch.float32).expand(len(rows))
    for t in timesteps:
        if should_stop is not None and should_stop():
            raise Cancelled("sampling cancelled between steps")
        hidden = latents[rows]
        velocity = pipe.transformer(
            hidden_states=hidden,
            timestep=t.expand(hidden.shape[0]).to(hidden.dtype) / 1000,
            guidance=guidance_vector,
            pooled_projections=pooled,
            encoder_hidden_states=embeds,
            txt_ids=text_ids,
            img_ids=image_ids,
            joint_attention_kwargs={},
            return_dict=False,
        )[0]
        velocity = compose(velocity[: len(jobs)], velocity[len(jobs) :], masks, owners)
        latents = pipe.scheduler.step(velocity, t, latents, return_dict=False)[0]
    return decode(pipe, latents, width, height)


def decode(pipe, latents: torch.Tensor, width: int, height: int):
    latents = pipe._unpack_latents(latents, height, width, pipe.vae_scale_factor)
    latents = latents / pipe.vae.config.scaling_factor + pipe.vae.config.shift_factor
    image = pipe.vae.decode(latents.to(pipe.vae.dtype), return_dict=False)[0]
    return pipe.image_processor.postprocess(image, output_type="pil")
