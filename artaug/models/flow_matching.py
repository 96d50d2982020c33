"""The FLUX flow-matching objective as FLUX LoRA trainers use it, on cached latents.

Latents (B, 16, h, w) are packed into 2x2 patches, (B, h/2 * w/2, 64), the sequence the transformer
reads. A timestep t in (0, 1) is drawn logit-normally and shifted toward noise by the FLUX schedule's
resolution-dependent shift mu; the input is x_t = (1 - t) x_0 + t noise and the model predicts the
velocity noise - x_0. Guidance-distilled models (FLUX.1-dev) also get the guidance embedding.
"""

from __future__ import annotations

import math

import torch

# FLUX.1-dev's scheduler: mu grows linearly with the image token count between these points.
BASE_SHIFT, MAX_SHIFT = 0.5, 1.15
BASE_SEQ_LEN, MAX_SEQ_LEN = 256, 4096


def pack(latents: torch.Tensor) -> torch.Tensor:
    """(B, C, h, w) -> (B, h/2 * w/2, 4C): 2x2 patches in row-major order, as FluxPipeline packs them."""
    b, c, h, w = latents.shape
    patches = latents.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)
    return patches.reshape(b, (h // 2) * (w // 2), c * 4)


def image_ids(h: int, w: int, device=None, dtype=torch.float32) -> torch.Tensor:
    """Rotary position ids (h/2 * w/2, 3) of packed latents: (0, row, column)."""
    ids = torch.zeros(h // 2, w // 2, 3, device=device, dtype=dtype)
    ids[..., 1] = torch.arange(h // 2, device=device, dtype=dtype)[:, None]
    ids[..., 2] = torch.arange(w // 2, device=device, dtype=dtype)[None, :]
    return ids.reshape(-1, 3)


def flux_shift(seq_len: int) -> float:
    """The FLUX schedule's mu for an image of `seq_len` packed tokens."""
    slope = (MAX_SHIFT - BASE_SHIFT) / (MAX_SEQ_LEN - BASE_SEQ_LEN)
    return BASE_SHIFT + slope * (seq_len - BASE_SEQ_LEN)


def sample_timesteps(n: int, seq_len: int, generator: torch.Generator) -> torch.Tensor:
    """n timesteps in (0, 1): sigmoid of a standard normal, then shifted by exp(mu) as FLUX samples."""
    t = torch.sigmoid(torch.randn(n, generator=generator))
    scale = math.exp(flux_shift(seq_len))
    return scale / (scale + (1 / t - 1))


def flow_matching_loss(
    transformer,
    latents: torch.Tensor,
    prompt_embeds: torch.Tensor,
    pooled_embeds: torch.Tensor,
    generator: torch.Generator,
    guidance: float | None,
) -> torch.Tensor:
    """Mean squared velocity error of one batch of same-sized latents (float32 loss).

    Noise and timesteps come from `generator` (on CPU, so they are the same on any device).
    `guidance` is None for models without a guidance embedding.
    """
    b, _, h, w = latents.shape
    x0 = pack(latents)
    noise = torch.randn(x0.shape, generator=generator).to(x0.device, x0.dtype)
    t = sample_timesteps(b, x0.shape[1], generator).to(x0.device, x0.dtype)
    noisy = (1 - t[:, None, None]) * x0 + t[:, None, None] * noise
    prediction = predict(transformer, noisy, t, prompt_embeds, pooled_embeds, h, w, guidance)
    return torch.nn.functional.mse_loss(prediction.float(), (noise - x0).float())


def predict(transformer, noisy, t, prompt_embeds, pooled_embeds, h: int, w: int, guidance: float | None):
    """The transformer's velocity for packed `noisy` latents at timesteps `t` (in (0, 1))."""
    device, dtype = noisy.device, noisy.dtype
    return transformer(
        hidden_states=noisy,
        timestep=t,
        guidance=None
        if guidance is None
        else torch.full((noisy.shape[0],), guidance, device=device, dtype=dtype),
        pooled_projections=pooled_embeds,
        encoder_hidden_states=prompt_embeds,
        txt_ids=torch.zeros(prompt_embeds.shape[1], 3, device=device, dtype=dtype),
        img_ids=image_ids(h, w, device, dtype),
        return_dict=False,
    )[0]
