"""`RunConfig`: every section of a run, nested under its name."""

from __future__ import annotations

import typing
from dataclasses import field
from typing import Literal

from artaug.config.base import FolderName, Text, section
from artaug.config.sections import (
    EnhanceConfig,
    GenerateConfig,
    HubConfig,
    ModelConfig,
    RayConfig,
    ServeConfig,
)
from artaug.config.stages import (
    CritiqueConfig,
    EvaluateConfig,
    FilterConfig,
    LoopConfig,
    SafetyConfig,
    ScorersConfig,
    TrainConfig,
)

Preset = Literal["world", "tiny", "flux-dev", "flux-dev-smoke", "flux-dev-shapes"]
PRESETS: tuple[str, ...] = typing.get_args(Preset)


@section
class RunConfig:
    name: FolderName = "artaug"
    """Run name, used in log lines and as a folder name: letters, digits, '.', '_', '-'."""
    preset: Preset = "tiny"
    """Preset these values started from (informational once resolved)."""
    output_root: Text = "runs"
    """Where `artaug run` creates run directories (local path, s3:// or gs://)."""
    prompts: Text = ""
    """Prompt file for `artaug run`; empty uses the prompts shipped with the package (loop.prompt_set)."""
    ray: RayConfig = field(default_factory=RayConfig)
    """Ray cluster settings."""
    hub: HubConfig = field(default_factory=HubConfig)
    """Where model weights are cached and whether runs may reach the hub (the token is never config)."""
    model: ModelConfig = field(default_factory=ModelConfig)
    """Synthesis model (FLUX) settings."""
    generate: GenerateConfig = field(default_factory=GenerateConfig)
    """Generate stage settings."""
    critique: CritiqueConfig = field(default_factory=CritiqueConfig)
    """Critique stage settings (the understanding model)."""
    enhance: EnhanceConfig = field(default_factory=EnhanceConfig)
    """Enhance stage settings (the interaction algorithm); its actor pool uses generate's settings."""
    serve: ServeConfig = field(default_factory=ServeConfig)
    """HTTP serving (`artaug serve`) settings."""
    scorers: ScorersConfig = field(default_factory=ScorersConfig)
    """Where the scorer models and heads live (the filter and evaluation pick scorers by name)."""
    safety: SafetyConfig = field(default_factory=SafetyConfig)
    """Safety checker: CLIP embeddings against a list of unsafe concepts."""
    filter: FilterConfig = field(default_factory=FilterConfig)
    """Pair filter: keep pairs whose after image is more beautiful, still faithful and safe."""
    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig)
    """`artaug evaluate`: base vs base + LoRA with scorers, an MLLM judge and confidence intervals."""
    train: TrainConfig = field(default_factory=TrainConfig)
    """Differential LoRA training settings (latent cache, Ray Train, DeepSpeed)."""
    loop: LoopConfig = field(default_factory=LoopConfig)
    """`artaug run`: rounds, early stopping, combining the rounds' LoRAs, final evaluation, report."""
