"""Which LoRAs a model carries: the one definition, with no model code, so that the command line can
check a comparison before torch and diffusers import. The LoRAs of `ModelConfig.loras` are fused in
order when the model loads (`artaug.models.synthesis`)."""

from __future__ import annotations

import dataclasses

from artaug.config import ModelConfig


def model_of_round(model: ModelConfig, earlier_rounds: list[str]) -> ModelConfig:
    """The model round k samples from: the configured model (with the LoRAs it starts from) plus the
    LoRAs of rounds 1..k-1, fused in order."""
    return dataclasses.replace(model, loras=[*model.loras, *earlier_rounds])


def enhanced_model(model: ModelConfig, combined: str) -> ModelConfig:
    """What a run produces and `artaug serve` serves: the configured model plus the rounds' combined LoRA."""
    return model_of_round(model, [combined])
