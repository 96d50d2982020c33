import dataclasses
import logging
import re
from pathlib import Path

import pytest

from artaug.config import (
    ConfigError,
    GenerateConfig,
    ModelConfig,
    Resources,
    RunConfig,
    describe,
    dotted,
    field_docs,
    load_config,
    override,
    reference_markdown,
    to_dict,
    to_yaml,
)
from artaug.errors import ArtaugError


def _sections() -> list[type]:
    sections = [type(v) for v in vars(RunConfig()).values() if dataclasses.is_dataclass(v)]
    return [RunConfig, *sections, Resources]


def test_every_field_has_a_default_and_a_docstring():
    assert len(_sections()) >= 12
    for cls in _sections():
        docs = field_docs(cls)
        for f in dataclasses.fields(cls):
            assert f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING
            assert docs.get(f.name), f"{cls.__name__}.{f.name} has no docstring"
    names = [name for name, _, _ in describe()]
    assert "generate.width" in names and "model.source" in names
    assert "generate.resources.gpus" in names and "train.resources.node_labels" in names
    defaults = {name: default for name, default, _ in describe()}
    assert defaults["generate.resources.gpus"] == "0.0"  # the section's default, not Resources()'s


def test_scalar_fields_are_strict():
    # A plain `int` annotation would let pydantic read "8" or True as a number; the aliases of
    # artaug.config.base (Int, Float, Bool, Text) do not.
    for cls in _sections():
        for name, info in cls.__pydantic_fields__.items():
            if info.annotation in (int, float, bool, str):
                assert any(getattr(m, "strict", False) for m in info.metadata), f"{cls.__name__}.{name}"


def test_defaults_are_the_tiny_preset():
    assert load_config("tiny") == RunConfig()
    assert GenerateConfig().resources == Resources(gpus=0.0)
    assert Resources().gpus == -1.0


def test_configuration_reference_is_current():
    path = Path(__file__).parents[1] / "docs" / "configuration.md"
    assert path.read_text() == reference_markdown(), "regenerate: artaug config fields --markdown"


def test_tiny_is_the_default_preset():
    cfg = load_config()
    assert cfg.preset == "tiny"
    assert cfg.model.source == "tiny" and cfg.model.device == "cpu"
    assert cfg.ray.address == "local"


def test_commands_start_from_the_world_preset():
    from artaug.cli import build_parser
    from artaug.cli.options import load

    args = build_parser().parse_args(["generate", "--prompts", "p.txt", "--out", "o"])
    cfg = load(args)
    assert cfg.preset == "world" and cfg.model.source == "world" and cfg.critique.backend == "world"
    assert cfg.filter.delta > 0 and cfg.loop.min_acceptance_rate > 0  # the gates are on
    args = build_parser().parse_args(["generate", "--prompts", "p.txt", "--out", "o", "--preset", "tiny"])
    assert load(args) == load_config("tiny")


def test_flux_dev_preset():
    cfg = load_config("flux-dev")
    assert cfg.model.source == "black-forest-labs/FLUX.1-dev"
    assert cfg.model.dtype == "bfloat16"
    assert (cfg.generate.width, cfg.generate.height) == (1024, 1024)
    assert cfg.generate.steps == 28 and cfg.generate.guidance == 3.5
    assert cfg.generate.resources.gpus == 1
    assert cfg.serve.resources.gpus == 1 and cfg.serve.host == "127.0.0.1"
    assert cfg.train.precision == "bfloat16" and cfg.train.gradient_checkpointing
    assert cfg.train.resources.gpus == 1 and cfg.train.zero_stage == 2
    # The authors' FLUX LoRA targets: attention, feed-forward and modulation (tests/test_flux_defaults.py).
    assert {"to_q", "ff.net.0.proj", "norm1.linear", "norm.linear"} <= set(cfg.train.target_modules)


def test_flux_dev_smoke_extends_flux_dev_and_fits_one_8_gpu_node():
    smoke, dev = load_config("flux-dev-smoke"), load_config("flux-dev")
    assert smoke.preset == "flux-dev-smoke"
    changed = {
        "generate.num_actors": 7, "critique.model": "Qwen/Qwen2.5-VL-7B-Instruct",
        "critique.tensor_parallel_size": 1, "train.steps": 40, "train.before_steps": 40,
        "train.num_workers": 7, "train.checkpoint_every": 20, "loop.rounds": 1, "loop.max_prompts": 64,
        "loop.new_prompts_each_round": False, "loop.eval_max_prompts": 64,
    }  # fmt: skip
    ours, theirs = dotted(to_dict(smoke)), dotted(to_dict(dev))
    assert {key for key, value in ours.items() if theirs[key] != value} == {"preset", *changed}
    assert all(ours[key] == value for key, value in changed.items())
    # The critic engine holds one GPU for the run; hosts and workers take the other 7.
    gpus = smoke.critique.tensor_parallel_size
    assert gpus + smoke.generate.num_actors * smoke.generate.resources.gpus == 8
    assert gpus + smoke.train.num_workers * smoke.train.resources.gpus == 8


def test_a_preset_extends_only_another_preset(monkeypatch):
    import artaug.config.loading as loading

    texts = {"world.yaml": "extends: flux-dev-smoke\n", "flux-dev-smoke.yaml": "extends: world\n"}
    monkeypatch.setattr(loading, "_preset_text", lambda name: texts.get(name, "extends: nowhere\n"))
    with pytest.raises(ConfigError, match="extends 'world', not another preset"):
        load_config("world")
    with pytest.raises(ConfigError, match="tiny.yaml: extends 'nowhere'"):
        load_config("tiny")


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
    path.write_text("model:\n  revision: 1234\ngenerate:\n  resources:\n    cpus: 2\n")
    cfg = load_config(path=str(path))
    assert cfg.model.revision == "1234"  # YAML reads it as a number; the field is text
    assert cfg.generate.resources == Resources(gpus=0.0, cpus=2.0)  # the rest keeps its defaults


def test_resolved_yaml_round_trips(tmp_path):
    cfg = load_config("tiny", overrides=["generate.steps=7", "name=demo"])
    path = tmp_path / "run.yaml"
    path.write_text(to_yaml(cfg))
    assert load_config(path=str(path)) == cfg


@pytest.mark.parametrize(
    "setting, message",
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
        (
            "train.mode=both",
            "train.mode: 'both' must be one of differential, direct, pairwise-average, per-pair, dpo",
        ),
        ("train.zero_stage=3", "train.zero_stage: 3 must be 1 or 2"),
        ("train.rank=0", "train.rank"),
        ("train.before_steps=0", "train.before_steps"),
        ("train.precision=float16", "train.precision"),
        ("train.zero_stage=2.0", "train.zero_stage: expected an integer"),
        ("train.target_modules=", "train.target_modules: '' must not be empty"),
        ("generate.seed=-1", "generate.seed: -1 must be in [0, 2**63)"),
        ("generate.resources.gpus=-2", "generate.resources.gpus: -2.0 must be -1 (auto) or >= 0"),
        ("generate.resources.cpus=0", "generate.resources.cpus: 0 must be > 0"),
        ("critique.base_url=ftp://x", "critique.base_url: 'ftp://x' must start with http:// or https://"),
        ("critique.gpu_memory_utilization=0", "must be in (0, 1]"),
        ("evaluate.judge_base_url=x", "evaluate.judge_base_url: 'x' must be empty or start with http"),
        ("safety.concepts=", "safety.concepts: [] must name at least one concept"),
        ("enhance.blur_kernel=4", "enhance.blur_kernel: 4 must be an odd number >= 1"),
        ("model.source= ", "model.source"),
        ("generate.steps.x=1", "generate.steps.x: steps is not a section"),
        ("generate=5", "generate: expected a mapping, got 5"),
    ],
)
def test_bad_values_are_rejected_with_the_field_named(setting, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_config(overrides=[setting])


def test_bad_preset_and_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="preset: 'nope'"):
        load_config("nope")
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(path=str(tmp_path / "missing.yaml"))
    bad = tmp_path / "bad.yaml"
    bad.write_text("generate: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(path=str(bad))


def test_config_error_is_an_artaug_error_and_a_value_error():
    with pytest.raises(ConfigError) as err:
        load_config(overrides=["generate.steps=0"])
    assert isinstance(err.value, ArtaugError) and isinstance(err.value, ValueError)
    assert "\n" not in str(err.value)


def test_configs_are_frozen_and_replace_validates():
    cfg = load_config()
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.generate.steps = 8
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.model = ModelConfig()
    model = dataclasses.replace(cfg.model, loras=["a.safetensors"])
    assert model.loras == ["a.safetensors"] and cfg.model.loras == []
    with pytest.raises(ConfigError, match=re.escape("model.max_sequence_length: 600 must be in [1, 512]")):
        dataclasses.replace(cfg.model, max_sequence_length=600)


def test_legacy_resource_keys_are_read_with_a_warning(tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="artaug.config"):
        cfg = load_config(overrides=["generate.gpus_per_actor=0.5", "train.node_labels=zone=a"])
    assert cfg.generate.resources.gpus == 0.5 and cfg.train.resources.node_labels == ["zone=a"]
    assert "generate.resources.gpus" in caplog.text and "train.resources.node_labels" in caplog.text
    path = tmp_path / "old.yaml"
    path.write_text("serve:\n  gpus_per_replica: 1\n  cpus_per_replica: 2\n")
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="artaug.config"):
        cfg = load_config(path=str(path))
    assert cfg.serve.resources == Resources(gpus=1.0, cpus=2.0)
    assert "serve.resources.cpus" in caplog.text
    path.write_text("serve:\n  gpus_per_replica: 1\n  resources:\n    gpus: 0\n")
    with pytest.raises(ConfigError, match="keep only serve.resources.gpus"):
        load_config(path=str(path))


def test_the_old_rewritten_prompt_switch_becomes_the_global_prompt_choice(tmp_path):
    path = tmp_path / "old-run.yaml"
    path.write_text("enhance:\n  use_rewritten_prompt: true\n")
    assert load_config(path=str(path)).enhance.global_prompt == "rewritten"
    assert load_config(overrides=["enhance.use_rewritten_prompt=false"]).enhance.global_prompt == "original"


def test_bad_node_labels_are_refused_naming_the_field():
    with pytest.raises(ConfigError, match=re.escape("train.resources.node_labels[1]: 'bad label'")):
        load_config(overrides=["train.resources.node_labels=zone=a,bad label"])
    with pytest.raises(ConfigError, match=re.escape("resources.node_labels[0]: 'x' is not a node label")):
        Resources(node_labels=["x"])


def test_override_applies_dotted_values_and_validates():
    cfg = load_config()
    changed = override(cfg, {"serve.host": "0.0.0.0", "serve.port": 9000, "model.loras": "a,b"})
    assert (changed.serve.host, changed.serve.port) == ("0.0.0.0", 9000)
    assert changed.model.loras == ["a", "b"] and cfg.serve.port == 8000
    assert to_dict(override(cfg, {})) == to_dict(cfg)
    with pytest.raises(ConfigError, match=re.escape("serve.port: 0 must be in [1, 65535]")):
        override(cfg, {"serve.port": 0})
    with pytest.raises(ConfigError, match="serve.prot: unknown field"):
        override(cfg, {"serve.prot": 1})
