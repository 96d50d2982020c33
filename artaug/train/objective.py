"""What one micro-batch of cached pairs costs in each training mode: the flow-matching loss on one
side's latents (the "before" or "after" phases), or the DPO loss on both sides (the "pairs" phase,
`artaug.train.preference`). Latents of different sizes run in separate passes, in a fixed order, so
the noise and timesteps each draws from the step's generator are the same on every attempt."""

from __future__ import annotations

import torch

from artaug.models.flow_matching import flow_matching_loss
from artaug.train.data import CachedPairs
from artaug.train.preference import flow_dpo_loss

PAIRS = "pairs"  # the phase of train.mode dpo (TrainConfig.phase_steps)


class Objective:
    def __init__(self, data: CachedPairs, beta: float, device, dtype, guidance: float | None):
        self.data, self.beta, self.device, self.dtype, self.guidance = data, beta, device, dtype, guidance

    def __call__(
        self, model, images: str, indices: list[int], generator
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The mean loss over `indices`, and (pairs phase) the mean implicit rewards (after, before) on
        CPU, else an empty tensor."""
        side = "after" if images == PAIRS else images
        by_shape: dict[tuple, list[int]] = {}
        for i in indices:
            by_shape.setdefault(tuple(self.data.latents[side][i].shape), []).append(i)
        total, rewards = 0, []
        for group in by_shape.values():
            embeds, pooled = self._stack(self.data.prompt_embeds, group), self._stack(self.data.pooled, group)
            if images == PAIRS:
                winner, loser = (self._stack(self.data.latents[s], group) for s in ("after", "before"))
                loss, *pair_rewards = flow_dpo_loss(
                    model, winner, loser, embeds, pooled, generator, self.guidance, self.beta
                )
                rewards.append(torch.stack(pair_rewards, 1))
            else:
                latents = self._stack(self.data.latents[images], group)
                loss = flow_matching_loss(model, latents, embeds, pooled, generator, self.guidance)
            total = total + loss * len(group)
        mean_rewards = torch.cat(rewards).mean(0).cpu() if rewards else torch.zeros(0)
        return total / len(indices), mean_rewards

    def _stack(self, tensors: list[torch.Tensor], rows: list[int]) -> torch.Tensor:
        return torch.stack([tensors[i] for i in rows]).to(self.device, self.dtype)
