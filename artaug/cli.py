"""The `artaug` command line. `artaug --help` lists the commands; each has its own --help."""

from __future__ import annotations

import argparse
import logging
import sys
import time
from importlib import resources

from artaug import storage
from artaug.cli_lora import add_commands as add_lora_commands
from artaug.config import ConfigError, RunConfig, describe, load_config, reference_markdown, to_yaml
from artaug.hub import HubError

log = logging.getLogger("artaug")


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return args.func(args)
    except Exception as err:
        # Cheap error types first: the full list imports every stage (seconds), and prefetch fails fast.
        if not isinstance(err, (ConfigError, HubError)) and not isinstance(err, _user_facing_errors()):
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
    run.add_argument("--resume", metavar="RUN_DIR", help="continue an interrupted run from its directory")
    run.set_defaults(func=cmd_run)

    rep = commands.add_parser("report", help="write RUN_DIR/report/index.html (also done by every run)")
    rep.add_argument("run_dir", help="run directory of `artaug run`")
    rep.set_defaults(func=cmd_report)

    gen = commands.add_parser("generate", help="generate images from a prompt file")
    gen.add_argument("--prompts", required=True, help=".txt, .jsonl, .csv or .parquet; path or URI")
    gen.add_argument("--out", required=True, help="output directory (local path, s3:// or gs://)")
    gen.add_argument("--round", type=int, default=1, help="round number recorded in the rows")
    gen.add_argument("--overwrite", action="store_true", help="replace a completed output")
    _config_options(gen)
    gen.set_defaults(func=cmd_generate)

    crit = commands.add_parser("critique", help="critique images with the understanding model")
    crit.add_argument("--images", required=True, help="a generate output folder, or a folder of images")
    crit.add_argument("--out", required=True, help="output directory (local path, s3:// or gs://)")
    crit.add_argument("--overwrite", action="store_true", help="replace a completed output")
    _config_options(crit)
    crit.set_defaults(func=cmd_critique)

    enh = commands.add_parser("enhance", help="turn images and their critiques into (before, after) pairs")
    enh.add_argument("--images", required=True, help="a completed generate output (or its parent folder)")
    enh.add_argument("--critiques", required=True, help="a completed critique output (or its parent folder)")
    enh.add_argument("--out", required=True, help="output directory (local path, s3:// or gs://)")
    enh.add_argument("--overwrite", action="store_true", help="replace a completed output")
    _config_options(enh)
    enh.set_defaults(func=cmd_enhance)

    filt = commands.add_parser("filter", help="keep the pairs whose after image is better, faithful and safe")
    filt.add_argument("--pairs", required=True, help="the enhance stage's pair Parquet folder (path or URI)")
    filt.add_argument("--out", required=True, help="output directory; the stage goes to OUT/filter")
    filt.add_argument("--overwrite", action="store_true", help="replace a completed output")
    _config_options(filt)
    filt.set_defaults(func=cmd_filter)

    ev = commands.add_parser("evaluate", help="compare base vs base + LoRA: scores, MLLM judge, intervals")
    ev.add_argument("--base", required=True, help='base model: hub id, local folder or "tiny"')
    ev.add_argument("--lora", action="append", default=[], metavar="PATH",
                    help="LoRA safetensors fused into the base, in order (repeatable)")  # fmt: skip
    ev.add_argument("--prompts", help="prompt file (default: the held-out prompts shipped with the package)")
    ev.add_argument("--out", required=True, help="output directory (metrics.json, report.txt, plots/)")
    ev.add_argument("--overwrite", action="store_true", help="replace a completed evaluation")
    _config_options(ev)
    ev.set_defaults(func=cmd_evaluate)

    critic = commands.add_parser("critic", help="a long-lived critic server")
    critic_sub = critic.add_subparsers(title="critic commands", required=True, metavar="COMMAND")
    serve_critic = critic_sub.add_parser("serve", help="start vLLM's OpenAI-compatible server for a VLM")
    serve_critic.add_argument(
        "model", nargs="?", help='hub id, local folder or "tiny" (default: critique.model)'
    )
    serve_critic.add_argument("--host", default="127.0.0.1", help="bind address (default 127.0.0.1)")
    serve_critic.add_argument("--port", type=int, default=8011, help="port (default 8011)")
    _config_options(serve_critic)
    serve_critic.set_defaults(func=cmd_critic_serve)

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
    tiny.add_argument("--vae", choices=["kl", "patch"], default="kl", help="patch: keeps colours")
    tiny.add_argument("--pretrain-steps", type=int, default=0, help="pretrain on drawn, captioned shapes")
    tiny.set_defaults(func=cmd_build_tiny)
    tiny_vlm = models_sub.add_parser("build-tiny-vlm", help="build and save the tiny random Qwen2-VL")
    tiny_vlm.add_argument("dir", help="folder to save the model into")
    tiny_vlm.add_argument("--seed", type=int, default=0, help="weights seed")
    tiny_vlm.set_defaults(func=cmd_build_tiny_vlm)

    srv = commands.add_parser(
        "serve", help="serve a run's enhanced model over HTTP (POST /v1/images/generations)"
    )
    srv.add_argument("run_dir", nargs="?", help="run directory: its run.yaml and lora/combined.safetensors")
    srv.add_argument("--lora", help="a LoRA .safetensors file to fuse instead (without RUN_DIR)")
    srv.add_argument("--host", help="address to bind (default serve.host: 127.0.0.1)")
    srv.add_argument("--port", type=int, help="HTTP port (default serve.port: 8000)")
    _config_options(srv)
    srv.set_defaults(func=cmd_serve)

    prefetch = models_sub.add_parser(
        "prefetch", help="download model weights into hub.cache_dir ahead of a run (then hub.offline=true)"
    )
    prefetch.add_argument(
        "repos", nargs="*", metavar="REPO", help="hub ids (default: every model the config names)"
    )
    _config_options(prefetch)
    prefetch.set_defaults(func=cmd_models_prefetch)

    convert = models_sub.add_parser("convert", help="rewrite a weights-only .pth/.pt as .safetensors")
    convert.add_argument("source", help="IN.pth or IN.pt (read with torch.load(weights_only=True) only)")
    convert.add_argument("target", help="OUT.safetensors")
    convert.set_defaults(func=cmd_models_convert)

    add_lora_commands(commands)  # fuse, lora combine | export

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
    from artaug.hub import apply

    cfg = load_config(preset=args.preset, path=args.config, overrides=args.overrides)
    apply(cfg.hub)
    return cfg


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

    save_tiny_flux(args.dir, seed=args.seed, vae=args.vae, pretrain_steps=args.pretrain_steps)
    print(f"tiny FLUX pipeline saved to {args.dir}")
    return 0


def cmd_build_tiny_vlm(args) -> int:
    from artaug.models.tiny_vlm import build_tiny_vlm

    build_tiny_vlm(args.dir, seed=args.seed)
    print(f"tiny Qwen2-VL saved to {args.dir}")
    return 0


def cmd_models_convert(args) -> int:
    from artaug.scorers.base import convert_to_safetensors

    if not args.target.endswith(".safetensors"):
        raise ScorerInputError(f"{args.target}: the target must end in .safetensors")
    count = convert_to_safetensors(args.source, args.target)
    print(f"{count} tensors written to {args.target}")
    return 0


def cmd_models_prefetch(args) -> int:
    from artaug.hub import Fetch, ensure_online, models_of, prefetch

    cfg = _load(args)
    ensure_online(cfg.hub)  # fail fast, before anything heavy is imported
    items = [Fetch("argument", repo) for repo in args.repos] or models_of(cfg)
    if not items:
        print("nothing to fetch: the configuration names no hub model")
        return 0
    for row in prefetch(items, cfg.hub):
        size = row["bytes"] / 1e9
        print(f"{row['repo']} ({row['field']}): {size:.2f} GB in {row['path']} ({row['seconds']} s)")
    print("runs can read these offline: --set hub.offline=true" + (
        f" --set hub.cache_dir={cfg.hub.cache_dir}" if cfg.hub.cache_dir else ""))  # fmt: skip
    return 0


class ScorerInputError(ValueError):
    """A bad argument to a scorer utility."""


def cmd_filter(args) -> int:
    from artaug.stages.filter import filter_pairs

    cfg = _load(args)
    stage_dir = storage.join(args.out, "filter")
    summary = filter_pairs(cfg, args.pairs, stage_dir, overwrite=args.overwrite)
    storage.write_text(storage.join(args.out, "run.yaml"), to_yaml(cfg))
    reasons = ", ".join(f"{k} {v}" for k, v in summary["reject_reasons"].items() if v) or "none"
    print(
        f"filter: {summary['rows']} pairs, {summary['accepted']} accepted, {summary['rejected']} rejected"
        f" (reasons: {reasons}); {summary['missing_images']} with missing images;"
        f" {summary['seconds']:.1f} s\n  pairs: {stage_dir}"
    )
    return 0


def cmd_evaluate(args) -> int:
    from artaug.prompts import read_prompts
    from artaug.stages.evaluate import evaluate

    cfg = _load(args)
    cfg.model.source = args.base
    loras = args.lora or list(cfg.model.loras)
    if args.prompts:
        prompts = read_prompts(args.prompts)
    else:
        with resources.as_file(resources.files("artaug.presets") / "eval_prompts.txt") as path:
            prompts = read_prompts(str(path))
    metrics = evaluate(cfg, loras, prompts, args.out, overwrite=args.overwrite)
    from artaug.stages.evaluate import format_table

    print(format_table(metrics), end="")
    print(
        f"  metrics: {storage.join(args.out, 'metrics.json')}\n  plots:   {storage.join(args.out, 'plots')}"
    )
    return 0


def cmd_critique(args) -> int:
    cfg = _load(args)
    storage.write_text(storage.join(args.out, "run.yaml"), to_yaml(cfg))
    _critique_into(cfg, args.images, args.out, args.overwrite)
    return 0


def cmd_enhance(args) -> int:
    cfg = _load(args)
    storage.write_text(storage.join(args.out, "run.yaml"), to_yaml(cfg))
    _enhance_into(cfg, args.images, args.critiques, args.out, args.overwrite)
    return 0


def _enhance_into(cfg: RunConfig, images: str, critiques: str, out: str, overwrite: bool) -> dict:
    from artaug.stages.enhance import enhance

    stage_dir = storage.join(out, "enhance")
    log.info("enhancing (%s) into %s", cfg.enhance.mode, stage_dir)
    summary = enhance(cfg, images, critiques, stage_dir, overwrite=overwrite)
    print(
        f"enhance ({summary['mode']}): {summary['rows']} pairs: {summary['enhanced']} enhanced,"
        f" {summary['unchanged']} unchanged, {summary['errors']} errors; {summary['seconds']:.1f} s"
        f"\n  pairs: {stage_dir}"
    )
    return summary


def _critique_into(cfg: RunConfig, images: str, out: str, overwrite: bool) -> dict:
    from artaug.stages.critique import critique

    stage_dir = storage.join(out, "critique")
    log.info("critiquing %s with the %s critic into %s", images, cfg.critique.backend, stage_dir)
    summary = critique(cfg, images, stage_dir, overwrite=overwrite)
    print(
        f"critique ({summary['backend']}): {summary['rows']} rows: {summary['ok']} ok, {summary['invalid']}"
        f" invalid, {summary['failed']} failed; {summary['with_suggestions']} with suggestions;"
        f" {summary['seconds']:.1f} s\n  critiques: {stage_dir}"
    )
    return summary


def cmd_critic_serve(args) -> int:
    from artaug.critique.server import start_server, stop_server, wait_ready
    from artaug.stages.critique import critic_model

    cfg = _load(args)
    if args.model:
        cfg.critique.model = args.model
    model = critic_model(cfg.critique)
    process, url = start_server(model, cfg.critique, args.host, args.port)
    try:
        wait_ready(process, url)
        print(f"critic ready at {url} ({model}); use it with --set critique.backend=openai"
              f" --set critique.base_url={url}   (Ctrl-C stops it)", flush=True)  # fmt: skip
        return process.wait()
    except KeyboardInterrupt:
        return 0
    finally:
        stop_server(process)


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
    args.pairs, args.out = storage.absolute(args.pairs), storage.absolute(args.out)
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
    """The main job: the whole loop (or the rest of it, with --resume), then the summary table."""
    from artaug import pipeline

    if args.resume:
        if args.config or args.preset or args.overrides or args.out:
            raise ConfigError(
                "--resume takes the run directory's own run.yaml: drop --config/--preset/--set/--out"
            )
        run_dir = storage.absolute(args.resume)
        cfg, manifest = pipeline.reopen(run_dir)
    else:
        cfg = _load(args)
        run_dir = args.out or storage.join(cfg.output_root, f"{cfg.name}-{time.strftime('%Y%m%d-%H%M%S')}")
        run_dir = storage.absolute(run_dir)  # Ray's workers run in other working directories
        manifest = pipeline.start(cfg, run_dir)
    print(f"run directory: {run_dir}")
    data = pipeline.Loop(cfg, run_dir, manifest).run(resumed=bool(args.resume))
    from artaug.report import summary_table

    print(summary_table(data), end="")
    combined = storage.join(run_dir, "lora", pipeline.COMBINED)
    if data.get("stopped_early"):
        print(f"stopped early in round {data['stopped_early']['round']}: {data['stopped_early']['reason']}")
    print(f"report:   {storage.join(run_dir, 'report', 'index.html')}")
    print(f"LoRA:     {combined if storage.exists(combined) else '(none: no round trained)'}")
    print(f"manifest: {storage.join(run_dir, 'manifest.json')}")
    return 0


def cmd_report(args) -> int:
    from artaug.report import write_report

    summary = write_report(args.run_dir)
    print(f"report: {summary['path']} ({summary['images']} thumbnails)")
    return 0


def cmd_serve(args) -> int:
    """Runs until interrupted (Ctrl-C or SIGTERM); without RUN_DIR or --lora, serves the base model."""
    from artaug.serve.launch import resolve_config, serve_locally

    overrides = list(args.overrides)
    overrides += [f"serve.host={args.host}"] if args.host else []
    overrides += [f"serve.port={args.port}"] if args.port is not None else []
    cfg = resolve_config(
        run_dir=args.run_dir, lora=args.lora, preset=args.preset, config_path=args.config, overrides=overrides
    )
    serve_locally(cfg)
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
    from artaug.cluster import SharedStorageError
    from artaug.critique.server import CriticServerError
    from artaug.lora import LoraFileError
    from artaug.manifest import RunDirError
    from artaug.models.synthesis import ModelSourceError
    from artaug.prompts import PromptFileError
    from artaug.safety import SafetyConfigError
    from artaug.scorers.base import ScorerWeightsError
    from artaug.serve.launch import ServeSetupError
    from artaug.stages.cache_latents import PairsError
    from artaug.stages.critique import CritiqueInputError
    from artaug.stages.enhance import EnhanceInputError
    from artaug.stages.evaluate import EvaluateInputError
    from artaug.stages.filter import FilterInputError
    from artaug.stages.generate import StageDoneError
    from artaug.train.launch import CheckpointConflictError

    return (
        ConfigError, PromptFileError, ModelSourceError, StageDoneError, CritiqueInputError, CriticServerError,
        EnhanceInputError, ServeSetupError, ScorerWeightsError, ScorerInputError, SafetyConfigError,
        FilterInputError, EvaluateInputError, PairsError, LoraFileError, CheckpointConflictError,
        SharedStorageError, RunDirError,
    )  # fmt: skip


if __name__ == "__main__":
    sys.exit(main())
