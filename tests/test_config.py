import dataclasses
import re
from pathlib import Path

import pytest

from artaug.config import (
    ConfigError,
    RunConfig,
    describe,
    field_docs,
    load_config,
    reference_markdown,
    to_yaml,
)


def test_every_field_has_a_default_and_a_docstring():
    sections = [type(v) for v in vars(RunConfig()).values() if dataclasses.is_dataclass(v)]
    assert len(sections) >= 10
    for cls in (RunConfig, *sections):
        docs = field_docs(cls)
        for f in dataclasses.fields(cls):
            assert f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING
            assert docs.get(f.name), f"{cls.__name__}.{f.name} has no docstring"
    names = [name for name, _, _ in describe()]
    assert "generate.width" in names and "model.source" in names


def test_configuration_reference_is_current():
    path = Path(__file__).parents[1] / "docs" / "configuration.md"
    assert path.read_text() == reference_markdown(), "regenerate: artaug config fields --markdown"


def test_tiny_is_the_default_preset():
    cfg = load_config()
    assert cfg.preset == "tiny"
    assert cfg.model.source == "tiny" and cfg.model.device == "cpu"
    assert cfg.ray.address == "local"


def test_flux_dev_preset():
    cfg = load_config("flux-dev")
    assert cfg.model.source == "black-forest-labs/FLUX.1-dev"
    assert cfg.model.dtype == "bfloat16"
    assert (cfg.generate.width, cfg.generate.height) == (1024, 1024)
    assert cfg.generate.steps == 28 and cfg.generate.guidance == 3.5
    assert cfg.generate.gpus_per_actor == 1
    assert cfg.serve.gpus_per_replica == 1 and cfg.serve.host == "127.0.0.1"
    assert cfg.train.precision == "bfloat16" and cfg.train.gradient_checkpointing
    assert cfg.train.gpus_per_worker == 1 and cfg.train.zero_stage == 2


def test_file_then_overrides(tmp_path):
    path = tmp_path / "my.yaml"
    path.write_text("preset: flux-dev\ngenerate:\n  steps: 10\n  width: 512\n")
    cfg = load_config(
        path=str(path), overrides=["generate.steps=12", "model.loras=a.safetensors,b.safetensors"]
    )
    assert cfg.preset == "flux-dev"
    assert cfg.generate.steps == 12  # --set wins over the file
    assert cfg.generate.width == 512  # the file wins over the preset
    assert cfg.generate.height == 1024  # the preset fills the rest
    assert cfg.model.loras == ["a.safetensors", "b.safetensors"]
    assert isinstance(load_config(overrides=["generate.guidance=4"]).generate.guidance, float)


def test_resolved_yaml_round_trips(tmp_path):
    cfg = load_config("tiny", overrides=["generate.steps=7", "name=demo"])
    path = tmp_path / "run.yaml"
    path.write_text(to_yaml(cfg))
    assert load_config(path=str(path)) == cfg


@pytest.mark.parametrize(
    "override, message",
    [
        ("generate.width=100", "generate.width: 100 is not a positive multiple of 16"),
        ("generate.height=0", "generate.height: 0 is not a positive multiple of 16"),
        ("generate.width=4096", "is above generate.max_side"),
        ("generate.steps=0", "generate.steps"),
        ("generate.steps=abc", "generate.steps: expected an integer"),
        ("generate.widht=64", "unknown field (did you mean 'width'?)"),
        ("nosuch.field=1", "nosuch: unknown field"),
        ("model.dtype=float8", "model.dtype"),
        ("model.max_sequence_length=600", "model.max_sequence_length"),
        ("ray.include_dashboard=maybe", "expected true or false"),
        ("generate.steps", "expected section.field=value"),
        ("serve.port=0", "serve.port: 0 must be in [1, 65535]"),
        ("serve.max_side=100", "serve.max_side"),
        ("serve.max_replicas=0", "serve.max_replicas"),
        ("serve.max_queued_requests=-1", "an unbounded queue is not offered"),
        ("serve.max_ongoing_requests=2", "must be >= serve.max_batch_size"),
        ("train.mode=both", "train.mode: 'both' must be one of differential, direct, pairwise-average"),
        ("train.zero_stage=3", "train.zero_stage: 3 must be 1 or 2"),
        ("train.rank=0", "train.rank"),
        ("train.before_steps=0", "train.before_steps"),
        ("train.precision=float16", "train.precision"),
    ],
)
def test_bad_values_are_rejected_with_the_field_named(override, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_config(overrides=[override])


def test_bad_preset_and_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="preset: 'nope'"):
        load_config("nope")
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(path=str(tmp_path / "missing.yaml"))
    bad = tmp_path / "bad.yaml"
    bad.write_text("generate: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(path=str(bad))
