"""One stage at a time, each into its own output folder: generate, critique, enhance, filter, train,
evaluate. Every command writes the resolved config beside its output (OUT/run.yaml), except inside a
run directory of `artaug run`: there it holds the run's lock and leaves the run's run.yaml alone."""

from __future__ import annotations

import functools
import logging

from artaug.cli.options import add_config_options, alias, load

log = logging.getLogger("artaug")
OVERWRITE = "replace a completed output"


def add_round_stages(commands) -> None:
    gen = commands.add_parser("generate", help="generate images from a prompt file")
    gen.add_argument("--prompts", required=True, help=".txt, .jsonl, .csv or .parquet; path or URI")
    gen.add_argument("--out", required=True, help="output directory (local path, s3:// or gs://)")
    gen.add_argument("--round", type=int, default=1, help="round number recorded in the rows")
    gen.add_argument("--overwrite", action="store_true", help=OVERWRITE)
    add_config_options(gen)
    gen.set_defaults(func=cmd_generate)

    crit = commands.add_parser("critique", help="critique images with the understanding model")
    crit.add_argument("--images", required=True, help="a generate output folder, or a folder of images")
    crit.add_argument("--out", required=True, help="output directory (local path, s3:// or gs://)")
    crit.add_argument("--overwrite", action="store_true", help=OVERWRITE)
    add_config_options(crit)
    crit.set_defaults(func=cmd_critique)

    enh = commands.add_parser("enhance", help="turn images and their critiques into (before, after) pairs")
    enh.add_argument("--images", required=True, help="a completed generate output (or its parent folder)")
    enh.add_argument("--critiques", required=True, help="a completed critique output (or its parent folder)")
    enh.add_argument("--out", required=True, help="output directory (local path, s3:// or gs://)")
    enh.add_argument("--overwrite", action="store_true", help=OVERWRITE)
    add_config_options(enh)
    enh.set_defaults(func=cmd_enhance)

    filt = commands.add_parser("filter", help="keep the pairs whose after image is better, faithful and safe")
    filt.add_argument("--pairs", required=True, help="the enhance stage's pair Parquet folder (path or URI)")
    filt.add_argument("--out", required=True, help="output directory; the stage goes to OUT/filter")
    filt.add_argument("--overwrite", action="store_true", help=OVERWRITE)
    add_config_options(filt)
    filt.set_defaults(func=cmd_filter)

    train = commands.add_parser("train", help="train a LoRA from enhanced pairs (Ray Train + DeepSpeed)")
    train.add_argument("--pairs", required=True, help="pair folder (Parquet, the enhance/filter output)")
    train.add_argument("--out", required=True, help="output directory (local path, s3:// or gs://)")
    train.add_argument("--round", type=int, help="round recorded in the LoRA (default: the pairs' round)")
    train.add_argument("--overwrite", action="store_true", help=OVERWRITE + " and its checkpoints")
    add_config_options(train)
    train.set_defaults(func=cmd_train)


def add_evaluate(commands) -> None:
    ev = commands.add_parser(
        "evaluate", help="compare a model with and without LoRAs: scores, judge, intervals"
    )
    add_config_options(ev)
    alias(ev, "--base", "model.source", required=True)
    ev.add_argument(
        "--lora", action="append", default=[], metavar="PATH",
        help="LoRA safetensors added to the base (and its model.loras), in order (repeatable)",
    )  # fmt: skip
    ev.add_argument(
        "--prompts",
        help="prompt file (default: the config's held-out prompts: loop.eval_prompts or loop.prompt_set's,"
        " the first loop.eval_max_prompts)",
    )
    ev.add_argument("--out", required=True, help="output directory (metrics.json, report.txt, plots/)")
    ev.add_argument("--overwrite", action="store_true", help="replace a completed evaluation")
    ev.set_defaults(func=cmd_evaluate)


def _into_run(stage_is_out: bool = False):
    """A command writing into a run directory holds the run's lock while it runs (one writer per
    run); `stage_is_out`: its stage writes OUT itself, which must then not be the run's root."""

    def wrap(fn):
        @functools.wraps(fn)
        def run(args) -> int:
            from artaug.runlock import writing_into

            with writing_into(args.out, stage_is_out):
                return fn(args)

        return run

    return wrap


def _write_config(cfg, out: str, just_written: bool = False) -> None:
    """OUT/run.yaml, except inside a run directory (the run's own run.yaml stays its truth) or where
    OUT holds a completed stage (its marker covers the run.yaml written with it) that this command
    did not just write."""
    from artaug import storage
    from artaug.config import to_yaml
    from artaug.runlock import find_run_dir

    run_dir = find_run_dir(out)
    if run_dir is not None or (storage.is_complete(out) and not just_written):
        why = f"inside the run directory {run_dir}" if run_dir else "a completed stage"
        log.info("%s: run.yaml left as it is (%s)", out, why)
        return
    storage.write_text(storage.join(out, "run.yaml"), to_yaml(cfg))


@_into_run()
def cmd_generate(args) -> int:
    from artaug import storage
    from artaug.prompts import read_prompts

    cfg = load(args)
    prompts = read_prompts(args.prompts, settings=cfg.generate)  # refused before torch and Ray import
    from artaug.preview import write_contact_sheet
    from artaug.stages.generate import generate

    _write_config(cfg, args.out)
    for note in prompts.notes:
        log.info("%s: %s", prompts.source, note)
    stage_dir = storage.join(args.out, "generate")
    log.info("generating %d prompt(s) into %s", len(prompts.rows), stage_dir)
    s = generate(cfg, prompts, stage_dir, round_index=args.round, overwrite=args.overwrite)
    preview = write_contact_sheet(stage_dir, storage.join(args.out, "preview.png"))
    print(
        f"generate: {s['rows']} rows, {s['images']} images, {s['errors']} errors, {s['warnings']} warnings,"
        f" {s['skipped_blank_prompts']} blank prompts skipped, {s['seconds']:.1f} s"
        f" ({s['images_per_second']} images/s)\n  images:  {stage_dir}\n  preview: {preview}"
    )
    return 0


@_into_run()
def cmd_critique(args) -> int:
    from artaug import storage
    from artaug.stages import inputs

    cfg = load(args)
    inputs.images_to_critique(args.images)  # refused before torch and Ray import
    from artaug.stages.critique import critique

    _write_config(cfg, args.out)
    stage_dir = storage.join(args.out, "critique")
    log.info("critiquing %s with the %s critic into %s", args.images, cfg.critique.backend, stage_dir)
    s = critique(cfg, args.images, stage_dir, overwrite=args.overwrite)
    print(
        f"critique ({s['backend']}): {s['rows']} rows: {s['ok']} ok, {s['invalid']} invalid, {s['failed']}"
        f" failed; {s['with_suggestions']} with suggestions; {s['seconds']:.1f} s\n  critiques: {stage_dir}"
    )
    return 0


@_into_run()
def cmd_enhance(args) -> int:
    from artaug import storage
    from artaug.stages import inputs

    cfg = load(args)
    inputs.generated(args.images)  # refused before torch and Ray import
    inputs.critiques(args.critiques)
    from artaug.stages.enhance import enhance

    _write_config(cfg, args.out)
    stage_dir = storage.join(args.out, "enhance")
    log.info("enhancing (%s) into %s", cfg.enhance.mode, stage_dir)
    s = enhance(cfg, args.images, args.critiques, stage_dir, overwrite=args.overwrite)
    print(
        f"enhance ({s['mode']}): {s['rows']} pairs: {s['enhanced']} enhanced, {s['unchanged']} unchanged,"
        f" {s['errors']} errors; {s['seconds']:.1f} s\n  pairs: {stage_dir}"
    )
    return 0


@_into_run()
def cmd_filter(args) -> int:
    from artaug import storage
    from artaug.stages import inputs

    cfg = load(args)
    inputs.pairs(args.pairs)  # refused before torch and Ray import
    from artaug.stages.filter import filter_pairs

    stage_dir = storage.join(args.out, "filter")
    s = filter_pairs(cfg, args.pairs, stage_dir, overwrite=args.overwrite)
    _write_config(cfg, args.out)
    reasons = ", ".join(f"{k} {v}" for k, v in s["reject_reasons"].items() if v) or "none"
    print(
        f"filter: {s['rows']} pairs, {s['accepted']} accepted, {s['rejected']} rejected (reasons: {reasons});"
        f" {s['missing_images']} with missing images; {s['seconds']:.1f} s\n  pairs: {stage_dir}"
    )
    return 0


@_into_run(stage_is_out=True)
def cmd_train(args) -> int:
    from artaug import storage
    from artaug.train.pairs import eligible_pairs

    cfg = load(args)
    pairs, out = storage.absolute(args.pairs), storage.absolute(args.out)
    eligible_pairs(pairs)  # refused before torch and Ray import
    from artaug.stages.train import train

    if not args.overwrite:  # --overwrite clears OUT, run.yaml included: written again below
        _write_config(cfg, out)
    s = train(cfg, pairs, out, round_index=args.round, overwrite=args.overwrite)
    if args.overwrite:
        _write_config(cfg, out, just_written=True)
    cache = s["cache"]
    skipped = ", ".join(f"{n} {reason}" for reason, n in cache["skipped"].items()) or "none"
    if s["mode"] == "per-pair":
        resumed = ", ".join(f"{n} {what}" for what, n in s["pairs"].items())
        if "relative_error" in s:
            resumed += f"; mean compressed to rank {s['rank']}, error {s['relative_error']['overall']:.4f}"
    else:
        resumed = "resumed from steps: " + (", ".join(str(r["from_step"]) for r in s["restarts"]) or "none")
    first, final = s["first_loss"], s["final_loss"]
    loss = f"loss {first:.4f} -> {final:.4f}" if first is not None else "no new fit"
    print(
        f"train: {cache['pairs']} pairs, {cache['usable']} used, skipped: {skipped}\n"
        f"  {s['mode']}, {s['steps']} steps, {loss}, {s['seconds']:.1f} s, {resumed}\n"
        f"  lora:    {s['lora']}\n  metrics: {storage.join(out, 'lora', 'metrics.jsonl')}"
    )
    return 0


@_into_run(stage_is_out=True)
def cmd_evaluate(args) -> int:
    from artaug import storage
    from artaug.loop.prompt_sets import eval_prompts
    from artaug.models.lineage import model_of_round
    from artaug.prompts import read_prompts
    from artaug.stages import inputs

    cfg = load(args)
    enhanced = model_of_round(cfg.model, args.lora)
    inputs.compared(cfg.model, enhanced)  # refused before torch and Ray import
    from artaug.stages.evaluate import evaluate

    # Without --prompts: the held-out prompts a run of this config evaluates on (loop.prompt_set).
    prompts = read_prompts(args.prompts, settings=cfg.generate) if args.prompts else eval_prompts(cfg)
    evaluate(cfg, prompts, args.out, base=cfg.model, enhanced=enhanced, overwrite=args.overwrite)
    print(storage.read_bytes(storage.join(args.out, "report.txt")).decode(), end="")
    print(
        f"  metrics: {storage.join(args.out, 'metrics.json')}\n  plots:   {storage.join(args.out, 'plots')}"
    )
    return 0
