"""What every command that reads the configuration shares: --config, --preset, --set, and flags that
alias one config field (e.g. `--port` for serve.port), whose help text is the field's docstring."""

from __future__ import annotations

import argparse
import functools

from artaug import config
from artaug.config import RunConfig

# Commands start from the miniature world (artaug/world.py): a run whose images, critiques and scores
# mean something. The Python API's load_config() starts from the field defaults (the tiny recipe).
DEFAULT_PRESET = "world"


@functools.cache
def _field_docs() -> dict[str, str]:
    return {name: doc for name, _, doc in config.describe()}


def add_config_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="YAML config file (local path or URI)")
    parser.add_argument("--preset", help=f"{' or '.join(config.PRESETS)} (default: {DEFAULT_PRESET})")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="SECTION.FIELD=VALUE",
        help="override one field, e.g. --set generate.steps=8 (repeatable)",
    )
    parser.set_defaults(aliases={})


def alias(parser: argparse.ArgumentParser, flag: str, field: str, **kwargs) -> None:
    """`flag` sets config `field`; applied after --config, --preset and --set."""
    dest = flag.lstrip("-").replace("-", "_")
    doc = _field_docs()[field].rstrip(".")
    parser.add_argument(flag, dest=dest, default=None, help=f"{doc} (sets {field})", **kwargs)
    parser.set_defaults(aliases={**parser.get_default("aliases"), dest: field})


def load(args: argparse.Namespace) -> RunConfig:
    """The validated config of a command: defaults <- preset <- file <- --set <- alias flags."""
    from artaug.hub import apply  # reaches huggingface_hub: not needed for --help

    cfg = config.load_config(args.preset, args.config, args.overrides, default_preset=DEFAULT_PRESET)
    values = {
        field: getattr(args, dest) for dest, field in args.aliases.items() if getattr(args, dest) is not None
    }
    if values:
        cfg = config.override(cfg, values)
    apply(cfg.hub)
    return cfg
