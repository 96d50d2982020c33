"""`artaug fuse` and `artaug lora combine | export`: LoRA files across rounds, without Ray."""

from __future__ import annotations

from artaug.cli.options import add_config_options, alias, load


def add_commands(commands) -> None:
    fuse = commands.add_parser("fuse", help="fuse LoRAs into a model and save plain weights (no LoRA layers)")
    add_config_options(fuse)
    alias(fuse, "--base", "model.source", required=True)
    fuse.add_argument(
        "--lora", action="append", required=True, metavar="FILE",
        help="LoRA safetensors added to the base (and its model.loras), in order (repeatable; path or URI)",
    )  # fmt: skip
    alias(fuse, "--scale", "model.lora_scale", type=float)
    fuse.add_argument("--out", required=True, help="local folder for the fused diffusers pipeline")
    fuse.set_defaults(func=cmd_fuse)

    lora = commands.add_parser("lora", help="combine LoRA files or convert their key layout")
    sub = lora.add_subparsers(title="lora commands", required=True, metavar="COMMAND")
    comb = sub.add_parser("combine", help="one adapter equal to fusing the inputs in order")
    comb.add_argument("files", nargs="+", help="LoRA safetensors files (paths or URIs), in round order")
    comb.add_argument("--out", required=True, help="output .safetensors (diffusers layout; path or URI)")
    comb.add_argument("--scale", type=float, action="append", help="one per input, in order (default 1 each)")
    comb.add_argument("--rank", type=int, help="re-compress every layer to this rank by SVD (reports error)")
    comb.set_defaults(func=cmd_combine)
    exp = sub.add_parser("export", help="rewrite a LoRA file in another key layout (same weights)")
    exp.add_argument("file", help="LoRA safetensors (diffusers, kohya or ComfyUI keys)")
    exp.add_argument("--format", required=True, choices=["kohya", "comfyui", "diffusers"], help="layout")
    exp.add_argument("--out", required=True, help="output .safetensors (path or URI)")
    exp.set_defaults(func=cmd_export)


def cmd_fuse(args) -> int:
    from artaug.models.lineage import model_of_round
    from artaug.models.synthesis import save_fused

    cfg = load(args)
    model = model_of_round(cfg.model, args.lora)
    save_fused(model, args.out)
    print(f"fused {len(model.loras)} LoRA(s) into {model.source}; plain pipeline saved to {args.out}")
    return 0


def cmd_combine(args) -> int:
    from artaug.lora.algebra import combine

    summary = combine(args.files, args.out, scales=args.scale, rank=args.rank)
    line = f"combined {len(args.files)} LoRA(s), {summary['layers']} layers, rank {summary['rank']}"
    if "relative_error" in summary:
        error = summary["relative_error"]
        line += f"; relative error {error['overall']:.2e} (worst layer {error['worst_layer']:.2e})"
    print(f"{line}\n  lora: {args.out}")
    return 0


def cmd_export(args) -> int:
    from artaug.lora.export import export

    summary = export(args.file, args.format, args.out)
    print(f"{summary['layers']} layers written in the {args.format} layout to {args.out}")
    return 0
