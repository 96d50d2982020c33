"""A colour-preserving tiny autoencoder behind AutoencoderKL's interface: a fixed linear 8x8-patch transform.

A randomly initialised tiny AutoencoderKL does not carry a pixel brightness or colour shift through
encode and decode (measured transfer about 0), so nothing learnt in its latent space can show such a
shift in pixels. This one maps each 8x8 patch of each colour channel onto a few orthonormal 2-D DCT
basis images (the constant one first): 5 per channel, 6 for green, 16 latent channels as FLUX has.
Decoding is the transpose, so decode then encode is exact, every patch keeps its mean colour, and a
per-channel gain on the pixels is a per-channel gain on the latents (it works on each channel alone).
The fine detail inside a patch is lost: it is a stand-in for measuring colour, not a good codec.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.autoencoders.autoencoder_kl import AutoencoderKLOutput
from diffusers.models.autoencoders.vae import DecoderOutput, DiagonalGaussianDistribution
from diffusers.models.modeling_utils import ModelMixin

PATCH = 8
# (colour channel, vertical frequency, horizontal frequency) of each latent channel.
BASES = [(c, u, v) for c in range(3) for u, v in ((0, 0), (0, 1), (1, 0), (1, 1), (0, 2))] + [(1, 2, 0)]


def dct_basis(u: int, v: int) -> torch.Tensor:
    """The orthonormal 2-D DCT-II basis image (u, v) of an 8x8 patch."""
    n = torch.arange(PATCH, dtype=torch.float64)

    def one(k):
        scale = math.sqrt((1 if k == 0 else 2) / PATCH)
        return scale * torch.cos(math.pi * (2 * n + 1) * k / (2 * PATCH))

    return one(u)[:, None] * one(v)[None, :]


class PatchAutoencoder(ModelMixin, ConfigMixin):
    """encode(x).latent_dist.mode() and decode(z).sample as AutoencoderKL has them; no weights to learn."""

    @register_to_config
    def __init__(
        self,
        latent_channels: int = 16,
        scaling_factor: float = 1.0,
        shift_factor: float = 0.0,
        block_out_channels: tuple[int, ...] = (1, 1, 1, 1),  # FluxPipeline reads 2**(len - 1) == 8
    ):
        super().__init__()
        weight = torch.zeros(len(BASES), 3, PATCH, PATCH, dtype=torch.float64)
        for i, (c, u, v) in enumerate(BASES):
            weight[i, c] = dct_basis(u, v)
        self.register_buffer("weight", weight.float())

    def encode(self, x: torch.Tensor, return_dict: bool = True):
        mean = F.conv2d(x, self.weight.to(x.dtype), stride=PATCH)
        # A zero-variance posterior: sample() == mode() (log-variance at the clamp floor, so std ~ 0).
        moments = torch.cat([mean, torch.full_like(mean, -30.0)], dim=1)
        posterior = DiagonalGaussianDistribution(moments, deterministic=True)
        return AutoencoderKLOutput(latent_dist=posterior) if return_dict else (posterior,)

    def decode(self, z: torch.Tensor, return_dict: bool = True, generator=None):
        image = F.conv_transpose2d(z, self.weight.to(z.dtype), stride=PATCH)
        return DecoderOutput(sample=image) if return_dict else (image,)
