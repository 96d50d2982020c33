"""`artaug run` (the whole loop, or the rest of it with --resume) and `artaug report`."""

from __future__ import annotations

import time

from artaug.cli.options import add_config_options, load
from artaug.config import ConfigError


def add_run(commands) -> None:
    run = commands.add_parser("run", help="run the ArtAug loop (default: the miniature world, local Ray)")
    add_config_options(run)
    run.add_argument("--out", help="run directory (default: <output_root>/<name>-<timestamp>)")
    run.add_argument("--resume", metavar="RUN_DIR", help="continue an interrupted run from its directory")
    run.set_defaults(func=cmd_run)


def add_report(commands) -> None:
    report = commands.add_parser("report", help="write RUN_DIR/report/index.html (also done by every run)")
    report.add_argument("run_dir", help="run directory of `artaug run`")
    report.set_defaults(func=cmd_report)


def cmd_run(args) -> int:
    from artaug import storage
    from artaug.hub import apply
    from artaug.layout import RunLayout
    from artaug.loop.prompt_sets import check_prompts
    from artaug.loop.rundir import reopen, start
    from artaug.runlock import hold

    # Every refusal (settings, prompts, the run directory) comes within about a second: torch, Ray and
    # the stages are imported with the loop, once the run is set to start.
    if args.resume:
        if args.config or args.preset or args.out:
            raise ConfigError(
                "--resume takes the run directory's own run.yaml: drop --config/--preset/--out"
                " (--set may change train.* settings of trainings not yet complete)"
            )
        run_dir = storage.absolute(args.resume)
        cfg, _ = reopen(run_dir, args.overrides)  # checked before the lock is taken; read again while held
        apply(cfg.hub)  # as load() does for a new run: before Ray starts, so its workers inherit it
        check_prompts(cfg)
    else:
        cfg = load(args)
        check_prompts(cfg)  # before the run directory is created
        run_dir = args.out or storage.join(cfg.output_root, f"{cfg.name}-{time.strftime('%Y%m%d-%H%M%S')}")
        run_dir = storage.absolute(run_dir)  # Ray's workers run in other working directories
    with hold(run_dir, cfg.ray.shared_filesystem):  # one writer per run directory
        if args.resume:
            cfg, manifest = reopen(run_dir, args.overrides, record=True)
        else:
            manifest = start(cfg, run_dir)
        from artaug.loop.runner import Loop

        print(f"run directory: {run_dir}")
        data = Loop(cfg, run_dir, manifest).run(resumed=bool(args.resume))
    from artaug.loop.report import summary_table

    print(summary_table(data), end="")
    layout = RunLayout(run_dir)
    evaluation = storage.join(layout.evaluate, "report.txt")
    if storage.exists(evaluation):  # the evaluation's table: base vs enhanced, intervals, verdict
        print(storage.read_bytes(evaluation).decode(), end="")
    if data.get("stopped_early"):
        print(f"stopped early in round {data['stopped_early']['round']}: {data['stopped_early']['reason']}")
    print(f"report:   {layout.report_page}")
    combined = layout.combined_lora
    print(f"LoRA:     {combined if storage.exists(combined) else '(none: no round trained)'}")
    print(f"manifest: {layout.manifest}")
    return 0


def cmd_report(args) -> int:
    from artaug.loop.report import write_report

    summary = write_report(args.run_dir)
    print(f"report: {summary['path']} ({summary['images']} thumbnails)")
    return 0
