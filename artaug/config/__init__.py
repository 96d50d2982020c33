"""Run configuration: frozen, validated pydantic dataclasses, one per stage, nested in `RunConfig`.

Every field has a default and a docstring (the string literal under it); `field_docs` reads them so
`artaug config show` and the tests can use them. The defaults are the `tiny` CPU recipe. Values come
from, in order: the defaults, a preset (`artaug/presets/<name>.yaml`), a user YAML file, then
`--set section.field=value`. A config is frozen once built: change it with `dataclasses.replace`
or `override`, which validate again.

    cfg = load_config(preset="tiny", path="my.yaml", overrides=["generate.steps=8"])
    cfg = override(cfg, {"serve.host": "0.0.0.0"})
"""

from artaug.config.loading import RENAMED, dotted, load_config, override, to_dict, to_yaml
from artaug.config.messages import ConfigError
from artaug.config.reference import describe, field_docs, reference_markdown
from artaug.config.run import PRESETS, RunConfig
from artaug.config.sections import (
    EnhanceConfig,
    GenerateConfig,
    HubConfig,
    ModelConfig,
    RayConfig,
    Resources,
    ServeConfig,
)
from artaug.config.stages import (
    BUILT_IN_VLMS,
    CritiqueConfig,
    EvaluateConfig,
    FilterConfig,
    LoopConfig,
    SafetyConfig,
    ScorersConfig,
    TrainConfig,
)

__all__ = [
    "BUILT_IN_VLMS",
    "PRESETS",
    "RENAMED",
    "ConfigError",
    "CritiqueConfig",
    "EnhanceConfig",
    "EvaluateConfig",
    "FilterConfig",
    "GenerateConfig",
    "HubConfig",
    "LoopConfig",
    "ModelConfig",
    "RayConfig",
    "Resources",
    "RunConfig",
    "SafetyConfig",
    "ScorersConfig",
    "ServeConfig",
    "TrainConfig",
    "describe",
    "dotted",
    "field_docs",
    "load_config",
    "override",
    "reference_markdown",
    "to_dict",
    "to_yaml",
]
