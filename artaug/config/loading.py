"""Resolving a run's configuration: defaults <- preset <- YAML file <- `--set section.field=value`.

Layers are merged as plain nested mappings and validated once, as a whole, by `RunConfig`; so a
partial mapping (`generate: {resources: {cpus: 2}}`) keeps every other default of its section.
"""

from __future__ import annotations

import dataclasses
import logging
from importlib import resources
from typing import Any

import yaml

from artaug.config.messages import ConfigError
from artaug.config.run import PRESETS, RunConfig
from artaug.storage import read_bytes

log = logging.getLogger(__name__)

# Keys of the flat per-pool resource fields that came before the `resources` sub-sections. They are
# still read from YAML files and --set, with a warning naming the new key.
RENAMED = {
    "generate.gpus_per_actor": "generate.resources.gpus",
    "generate.cpus_per_actor": "generate.resources.cpus",
    "generate.torch_threads": "generate.resources.torch_threads",
    "generate.node_labels": "generate.resources.node_labels",
    "scorers.gpus_per_actor": "scorers.resources.gpus",
    "scorers.cpus_per_actor": "scorers.resources.cpus",
    "scorers.torch_threads": "scorers.resources.torch_threads",
    "scorers.node_labels": "scorers.resources.node_labels",
    "train.gpus_per_worker": "train.resources.gpus",
    "train.cpus_per_worker": "train.resources.cpus",
    "train.torch_threads": "train.resources.torch_threads",
    "train.node_labels": "train.resources.node_labels",
    "serve.gpus_per_replica": "serve.resources.gpus",
    "serve.cpus_per_replica": "serve.resources.cpus",
    "serve.torch_threads": "serve.resources.torch_threads",
    "serve.node_labels": "serve.resources.node_labels",
}
# Old keys whose value changed form too: old key -> (new key, old value -> new value).
REPLACED = {
    "enhance.use_rewritten_prompt": ("enhance.global_prompt", lambda on: "rewritten" if on else "original"),
}


def load_config(
    preset: str | None = None, path: str | None = None, overrides: list[str] | tuple = (),
    default_preset: str = "tiny",
) -> RunConfig:  # fmt: skip
    """Defaults <- preset <- YAML file <- `section.field=value` overrides, then validate.

    The preset comes from the argument, else from the file's `preset:` key, else `default_preset`
    ("tiny", whose values are the field defaults; the command line passes "world").
    """
    user = _migrate(_read_yaml_file(path), path) if path else {}
    preset = preset or user.get("preset") or default_preset
    if preset not in PRESETS:
        raise ConfigError(f"preset: {preset!r} is not one of {', '.join(PRESETS)}")
    tree = to_dict(RunConfig())
    _deep_update(tree, _preset_tree(preset))
    _deep_update(tree, user)
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--set {item!r}: expected section.field=value")
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError:
            raise ConfigError(f"--set {item!r}: the value is not valid YAML") from None
        _set(tree, key.strip(), value, "--set")
    tree["preset"] = preset
    return _build(tree)


def override(cfg: RunConfig, values: dict[str, object]) -> RunConfig:
    """`cfg` with dotted `section.field` values replaced (typed values, as `--set` parses them)."""
    tree = to_dict(cfg)
    for key, value in values.items():
        _set(tree, key, value, "override")
    return _build(tree)


def to_dict(cfg: Any) -> dict:
    return dataclasses.asdict(cfg)


def dotted(tree: dict, prefix: str = "") -> dict:
    """Every field of a config mapping (`to_dict`) by its dotted `section.field` key."""
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(dotted(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def to_yaml(cfg: Any) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


def _build(tree: dict) -> RunConfig:
    return RunConfig(**{str(key): value for key, value in tree.items()})


def _set(tree: dict, key: str, value: Any, where: str) -> None:
    if key in REPLACED:
        new, convert = REPLACED[key]
        log.warning("%s: %s is now %s; please use the new name", where, key, new)
        key, value = new, convert(value)
    if key in RENAMED:
        log.warning("%s: %s is now %s; please use the new name", where, key, RENAMED[key])
        key = RENAMED[key]
    keys = key.split(".")
    for part in keys[:-1]:
        node = tree.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"{key}: {part} is not a section")
        tree = node
    tree[keys[-1]] = value


def _migrate(data: dict, where: str) -> dict:
    """Move the old flat resource keys of a YAML mapping to their `resources` sub-section, and
    translate replaced keys (run.yaml files of earlier versions still load)."""
    for old, (new, convert) in REPLACED.items():
        section, flat = old.split(".")
        node = data.get(section)
        if isinstance(node, dict) and flat in node:
            log.warning("%s: %s is now %s; please use the new name", where, old, new)
            node[new.split(".")[1]] = convert(node.pop(flat))
    for old, new in RENAMED.items():
        section, flat = old.split(".")
        node = data.get(section)
        if not isinstance(node, dict) or flat not in node:
            continue
        target = node.get("resources")
        if target is None:
            target = node["resources"] = {}
        if not isinstance(target, dict):
            raise ConfigError(f"{where}: {section}.resources: expected a mapping, got {target!r}")
        leaf = new.rsplit(".", 1)[1]
        if leaf in target:
            raise ConfigError(f"{where}: {old} and {new} are the same setting; keep only {new}")
        log.warning("%s: %s is now %s; please use the new name", where, old, new)
        target[leaf] = node.pop(flat)
    return data


def _deep_update(base: dict, extra: dict) -> None:
    for key, value in extra.items():
        if isinstance(base.get(key), dict) and (isinstance(value, dict) or value is None):
            _deep_update(base[key], value or {})  # an empty `section:` keeps its defaults
        else:
            base[key] = value


def _preset_text(name: str) -> str:
    return resources.files("artaug.presets").joinpath(name).read_text()


def _preset_tree(preset: str, seen: tuple[str, ...] = ()) -> dict:
    """A preset's mapping; `extends: BASE` at its top applies the base preset's first, so a variant
    (flux-dev-smoke) lists only what it changes."""
    name = f"{preset}.yaml"
    data = _migrate(_read_yaml_text(_preset_text(name), name), name)
    base = data.pop("extends", None)
    if base is None:
        return data
    if base not in PRESETS or base in seen + (preset,):
        raise ConfigError(f"{name}: extends {base!r}, not another preset of {', '.join(PRESETS)}")
    tree = _preset_tree(base, seen + (preset,))
    _deep_update(tree, data)
    return tree


def _read_yaml_file(path: str) -> dict:
    try:
        text = read_bytes(path).decode("utf-8")
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    return _read_yaml_text(text, path)


def _read_yaml_text(text: str, where: str) -> dict:
    try:
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"{where}: not valid YAML: {err}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a mapping at the top level")
    return data
