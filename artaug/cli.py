"""The `artaug` command line. `artaug --help` lists the commands; each has its own --help."""

from __future__ import annotations

import argparse
import logging
import sys
import time
from importlib import resources

from artaug import storage
from artaug.config import ConfigError, RunConfig, describe, load_config, reference_markdown, to_yaml

log = logging.getLogger("artaug")


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return args.func(args)
    except Exception as err:
        if not isinstance(err, _user_facing_errors()):
            raise
        print(f"artaug: error: {err}", file=sys.stderr)
        return 2


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="artaug", description="ArtAug on Ray: make a text-to-image model more beautiful."
    )
    commands = parser.add_subparsers(title="commands", required=True, metavar="COMMAND")

    run = commands.add_parser("run", help="run the ArtAug job (default: tiny preset, local Ray)")
    _config_options(run)
    run.add_argument("--out", help="run directory (default: <output_root>/<name>-<timestamp>)")
    run.set_defaults(func=cmd_run)

    gen = commands.add_parser("generate", help="generate images from a prompt file")
    gen.add_argument("--prompts", required=True, help=".txt, .jsonl, .csv or .parquet; path or URI")
    gen.add_argument("--out", required=True, help="output directory (local path, s3:// or gs://)")
    gen.add_argument("--round", type=int, default=1, help="round number recorded in the rows")
    gen.add_argument("--overwrite", action="store_true", help="replace a completed output")
    _config_options(gen)
    gen.set_defaults(func=cmd_generate)

    train = commands.add_parser("train", help="train a LoRA from enhanced pairs (Ray Train + DeepSpeed)")
    train.add_argument("--pairs", required=True, help="pair folder (Parquet, the enhance/filter output)")
    train.add_argument("--out", required=True, help="output directory (local path, s3:// or gs://)")
    train.add_argument("--round", type=int, help="round recorded in the LoRA (default: the pairs' round)")
    train.add_argument(
        "--overwrite", action="store_true", help="replace a completed output and its checkpoints"
    )
    _config_options(train)
    train.set_defaults(func=cmd_train)

    models = commands.add_parser("models", help="model utilities")
    models_sub = models.add_subparsers(title="model commands", required=True, metavar="COMMAND")
    tiny = models_sub.add_parser("build-tiny", help="build and save the tiny random FLUX pipeline")
    tiny.add_argument("dir", help="folder to save the pipeline into")
    tiny.add_argument("--seed", type=int, default=0, help="weights seed")
    tiny.set_defaults(func=cmd_build_tiny)

    config = commands.add_parser("config", help="show the resolved configuration or its fields")
    config_sub = config.add_subparsers(title="config commands", required=True, metavar="COMMAND")
    show = config_sub.add_parser("show", help="print the resolved config as YAML")
    _config_options(show)
    show.set_defaults(func=cmd_config_show)
    fields = config_sub.add_parser("fields", help="list every field with its default and meaning")
    fields.add_argument("--markdown", action="store_true", help="as the table in docs/configuration.md")
    fields.set_defaults(func=cmd_config_fields)
    return parser


def _config_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="YAML config file (local path or URI)")
    parser.add_argument("--preset", help="tiny (default) or flux-dev")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="SECTION.FIELD=VALUE",
        help="override one field, e.g. --set generate.steps=8 (repeatable)",
    )


def _load(args) -> RunConfig:
    return load_config(preset=args.preset, path=args.config, overrides=args.overrides)


def cmd_config_show(args) -> int:
    print(to_yaml(_load(args)), end="")
    return 0


def cmd_config_fields(args) -> int:
    if args.markdown:
        print(reference_markdown(), end="")
        return 0
    for name, default, doc in describe():
        print(f"{name} = {default}\n    {doc}")
    return 0


def cmd_build_tiny(args) -> int:
    from artaug.models.tiny import save_tiny_flux

    save_tiny_flux(args.dir, seed=args.seed)
    print(f"tiny FLUX pipeline saved to {args.dir}")
    return 0


def cmd_generate(args) -> int:
    from artaug.prompts import read_prompts

    cfg = _load(args)
    prompts = read_prompts(args.prompts)
    storage.write_text(storage.join(args.out, "run.yaml"), to_yaml(cfg))
    _generate_into(cfg, prompts, args.out, args.round, args.overwrite)
    return 0


def cmd_train(args) -> int:
    from artaug.train.launch import train

    cfg = _load(args)
    storage.write_text(storage.join(args.out, "run.yaml"), to_yaml(cfg))
    summary = train(cfg, args.pairs, args.out, overwrite=args.overwrite, round_index=args.round)
    cache = summary["cache"]
    skipped = ", ".join(f"{n} {reason}" for reason, n in cache["skipped"].items()) or "none"
    restarts = ", ".join(str(r["from_step"]) for r in summary["restarts"]) or "none"
    print(
        f"train: {cache['pairs']} pairs, {cache['usable']} used, skipped: {skipped}\n"
        f"  {summary['mode']}, {summary['steps']} steps, loss {summary['first_loss']:.4f} -> "
        f"{summary['final_loss']:.4f}, {summary['seconds']:.1f} s, resumed from steps: {restarts}\n"
        f"  lora:    {summary['lora']}\n  metrics: {storage.join(args.out, 'lora', 'metrics.jsonl')}"
    )
    return 0


def cmd_run(args) -> int:
    """The main job. Today it runs the stages that exist (generate) and says where the output is."""
    from artaug.prompts import read_prompts

    cfg = _load(args)
    out = args.out or storage.join(cfg.output_root, f"{cfg.name}-{time.strftime('%Y%m%d-%H%M%S')}")
    if cfg.prompts:
        prompts = read_prompts(cfg.prompts)
    else:
        with resources.as_file(resources.files("artaug.presets") / "prompts.txt") as path:
            prompts = read_prompts(str(path))
    storage.write_text(storage.join(out, "run.yaml"), to_yaml(cfg))
    _generate_into(cfg, prompts, storage.join(out, "round-1"), 1, overwrite=False)
    print(f"run directory: {out} (resolved config: {storage.join(out, 'run.yaml')})")
    return 0


def _generate_into(cfg: RunConfig, prompts, out: str, round_index: int, overwrite: bool) -> dict:
    from artaug.preview import write_contact_sheet
    from artaug.stages.generate import generate, read_stage

    for note in prompts.notes:
        log.info("%s: %s", prompts.source, note)
    stage_dir = storage.join(out, "generate")
    log.info("generating %d prompt(s) into %s", len(prompts.rows), stage_dir)
    summary = generate(cfg, prompts, stage_dir, round_index=round_index, overwrite=overwrite)
    preview = write_contact_sheet(
        read_stage(stage_dir, columns=["prompt_id", "image"]), storage.join(out, "preview.png")
    )
    print(
        f"generate: {summary['rows']} rows, {summary['images']} images, {summary['errors']} errors,"
        f" {summary['warnings']} warnings, {summary['skipped_blank_prompts']} blank prompts skipped,"
        f" {summary['seconds']:.1f} s ({summary['images_per_second']} images/s)\n"
        f"  images:  {stage_dir}\n  preview: {preview}"
    )
    return summary


def _user_facing_errors() -> tuple[type[BaseException], ...]:
    """Errors reported as one line (no traceback); imported late so --help stays fast."""
    from artaug.lora import LoraFileError
    from artaug.models.synthesis import ModelSourceError
    from artaug.prompts import PromptFileError
    from artaug.stages.cache_latents import PairsError
    from artaug.stages.generate import StageDoneError
    from artaug.train.launch import CheckpointConflictError

    return (
        ConfigError,
        PromptFileError,
        ModelSourceError,
        StageDoneError,
        PairsError,
        LoraFileError,
        CheckpointConflictError,
    )


if __name__ == "__main__":
    sys.exit(main())
