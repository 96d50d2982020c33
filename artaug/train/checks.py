"""What a finished training reports so its result can be checked: a digest of the LoRA weights (every
rank must hold the same) and a probe (one deterministic forward pass that the saved file, loaded
elsewhere, must reproduce)."""

from __future__ import annotations

import hashlib

import torch

from artaug.models.flow_matching import pack, predict
from artaug.train.data import CachedPairs


@torch.no_grad()
def probe(transformer, data: CachedPairs, seed: int, guidance: float | None) -> dict[str, torch.Tensor]:
    """The inputs and output of one forward pass at t = 0.5 on the first cached after-latent."""
    device, dtype = transformer.device, transformer.dtype
    latents = data.latents["after"][0][None].to(device, dtype)
    _, _, h, w = latents.shape
    x0 = pack(latents)
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(seed)).to(x0)
    t = torch.full((1,), 0.5, device=device, dtype=dtype)
    inputs = {
        "noisy": 0.5 * x0 + 0.5 * noise,
        "t": t,
        "prompt_embeds": data.prompt_embeds[0][None].to(device, dtype),
        "pooled_embeds": data.pooled[0][None].to(device, dtype),
        "size": torch.tensor([h, w]),
        "guidance": torch.tensor([-1.0 if guidance is None else guidance]),
    }
    output = predict(
        transformer, inputs["noisy"], t, inputs["prompt_embeds"], inputs["pooled_embeds"], h, w, guidance
    )
    return {k: v.detach().to("cpu").contiguous() for k, v in {**inputs, "output": output}.items()}


def weights_digest(weights: dict[str, torch.Tensor]) -> str:
    digest = hashlib.sha256()
    for key in sorted(weights):
        digest.update(key.encode())
        digest.update(weights[key].detach().float().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


@torch.no_grad()
def nonfinite_weights(model: torch.nn.Module) -> torch.Tensor:
    """How many trainable tensors hold NaN or inf (a float tensor, for an all-reduce across ranks)."""
    trained = [p for p in model.parameters() if p.requires_grad]
    return torch.tensor(float(sum(int(not p.isfinite().all()) for p in trained)))
