"""train.mode dpo: the pairs as preferences, the after image preferred over the before image.

Diffusion-DPO (Wallace et al., 2023, arXiv 2311.12908) written for flow matching with velocity errors
in place of noise errors, as Flow-DPO does (Liu et al., 2025, arXiv 2501.13918). Per pair, winner w
(after) and loser l (before) are noised with the same noise and timestep; e = mean over elements of
the squared velocity error, of the trained model (LoRA on) and of the reference (the same model with
the LoRA disabled). The implicit rewards and the loss:

    r_w = -beta/2 (e_w - e_w_ref)    r_l = -beta/2 (e_l - e_l_ref)    loss = -log sigmoid(r_w - r_l)

At the start the LoRA changes nothing: both rewards are 0 and the loss is log 2. The loss falls when
r_w rises above r_l, which it also does when both fall (the model fits both images worse than the
reference, the loser faster): a known failure of DPO, which `both_fell` names.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F

from artaug.models.flow_matching import pack, predict, sample_timesteps

REWARDS = ("reward_after", "reward_before")  # metrics.jsonl keys: winner's, loser's implicit reward


def dpo_loss(
    error_w: torch.Tensor,
    error_l: torch.Tensor,
    ref_error_w: torch.Tensor,
    ref_error_l: torch.Tensor,
    beta: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Mean loss over pairs and each pair's implicit rewards (detached), from per-pair squared errors
    (each (B,): the mean over elements of one image's squared error) of the model and the reference."""
    reward_w = -0.5 * beta * (error_w - ref_error_w)
    reward_l = -0.5 * beta * (error_l - ref_error_l)
    loss = -F.logsigmoid(reward_w - reward_l).mean()
    return loss, reward_w.detach(), reward_l.detach()


def flow_dpo_loss(
    model,
    winner: torch.Tensor,
    loser: torch.Tensor,
    prompt_embeds: torch.Tensor,
    pooled_embeds: torch.Tensor,
    generator: torch.Generator,
    guidance: float | None,
    beta: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`dpo_loss` of one batch of same-sized latent pairs (B, 16, h, w): one noise and one timestep per
    pair (from `generator`, on CPU, in flow_matching_loss's order), FLUX's shift and guidance as it.
    `model`: the transformer with its LoRA (or a DeepSpeed engine around it)."""
    b, _, h, w = winner.shape
    x0 = pack(torch.cat([winner, loser]))
    noise = torch.randn(x0[:b].shape, generator=generator).to(x0.device, x0.dtype).repeat(2, 1, 1)
    t = sample_timesteps(b, x0.shape[1], generator).to(x0.device, x0.dtype).repeat(2)
    noisy = (1 - t[:, None, None]) * x0 + t[:, None, None] * noise
    inputs = (noisy, t, prompt_embeds.repeat(2, 1, 1), pooled_embeds.repeat(2, 1), h, w, guidance)
    target = (noise - x0).double()
    with torch.no_grad(), lora_disabled(getattr(model, "module", model)):
        reference = _errors(predict(getattr(model, "module", model), *inputs), target)
    errors = _errors(predict(model, *inputs), target)
    loss, reward_w, reward_l = dpo_loss(errors[:b], errors[b:], reference[:b], reference[b:], beta)
    return loss.float(), reward_w.float(), reward_l.float()


def _errors(prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per-sample mean over elements of the squared error, in float64: beta (hundreds) multiplies the
    difference of two such means, which float32 would round by about 1e-7 of each."""
    return (prediction.double() - target).pow(2).flatten(1).mean(1)


@contextlib.contextmanager
def lora_disabled(transformer):
    """The transformer without its LoRA layers' contribution (peft's switch; it also switches their
    requires_grad off and back on)."""
    transformer.disable_adapters()
    try:
        yield transformer
    finally:
        transformer.enable_adapters()


def both_fell(history: list[dict]) -> str | None:
    """A warning when both implicit rewards ended lower than they started (mean of the last quarter
    of the steps against the first step), else None; None for a history without rewards."""
    steps = [entry for entry in history if REWARDS[0] in entry]
    if len(steps) < 2:
        return None
    tail = steps[-max(1, len(steps) // 4) :]
    start = {key: steps[0][key] for key in REWARDS}
    end = {key: sum(entry[key] for entry in tail) / len(tail) for key in REWARDS}
    if not all(end[key] < start[key] for key in REWARDS):
        return None
    (after, before), (after_end, before_end) = (start[k] for k in REWARDS), (end[k] for k in REWARDS)
    return (
        f"dpo: both implicit rewards fell over the run (after {after:.4g} -> {after_end:.4g}, before"
        f" {before:.4g} -> {before_end:.4g}): the model fits both sides of the pairs worse than the"
        " reference, the before images more so; a known failure of DPO (README, train.mode=dpo):"
        " lower train.learning_rate or train.steps"
    )
