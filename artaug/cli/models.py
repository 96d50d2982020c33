"""`artaug models ...`: build the tiny models, stage hub weights ahead of a run, convert pickled heads."""

from __future__ import annotations

from artaug.cli.options import add_config_options, load
from artaug.config import BUILT_IN_VLMS
from artaug.errors import ArtaugError


class ConvertTargetError(ArtaugError, ValueError):
    """`artaug models convert` was given a target that is not a .safetensors file."""


def add_commands(commands) -> None:
    models = commands.add_parser("models", help="model utilities")
    sub = models.add_subparsers(title="model commands", required=True, metavar="COMMAND")
    tiny = sub.add_parser("build-tiny", help="build and save the tiny random FLUX pipeline")
    tiny.add_argument("dir", help="folder to save the pipeline into")
    tiny.add_argument("--seed", type=int, default=0, help="weights seed")
    tiny.add_argument("--vae", choices=["kl", "patch"], default="kl", help="patch: keeps colours")
    tiny.add_argument("--pretrain-steps", type=int, default=0, help="pretrain on drawn, captioned shapes")
    tiny.set_defaults(func=cmd_build_tiny)
    tiny_vlm = sub.add_parser("build-tiny-vlm", help="build and save the tiny random Qwen2-VL")
    tiny_vlm.add_argument("dir", help="folder to save the model into")
    tiny_vlm.add_argument("--seed", type=int, default=0, help="weights seed")
    tiny_vlm.add_argument("--family", choices=BUILT_IN_VLMS, default="tiny", help="Qwen2-VL or Qwen2.5-VL")
    tiny_vlm.set_defaults(func=cmd_build_tiny_vlm)

    prefetch = sub.add_parser(
        "prefetch", help="download model weights into hub.cache_dir ahead of a run (then hub.offline=true)"
    )
    prefetch.add_argument(
        "repos", nargs="*", metavar="REPO", help="hub ids (default: every model the config names)"
    )
    add_config_options(prefetch)
    prefetch.set_defaults(func=cmd_prefetch)

    convert = sub.add_parser("convert", help="rewrite a weights-only .pth/.pt as .safetensors")
    convert.add_argument("source", help="IN.pth or IN.pt (read with torch.load(weights_only=True) only)")
    convert.add_argument("target", help="OUT.safetensors")
    convert.set_defaults(func=cmd_convert)


def cmd_build_tiny(args) -> int:
    from artaug.models.tiny import save_tiny_flux

    save_tiny_flux(args.dir, seed=args.seed, vae=args.vae, pretrain_steps=args.pretrain_steps)
    print(f"tiny FLUX pipeline saved to {args.dir}")
    return 0


def cmd_build_tiny_vlm(args) -> int:
    from artaug.critic.tiny_vlm import build_tiny_vlm

    build_tiny_vlm(args.dir, seed=args.seed, family=args.family)
    print(f"built-in VLM {args.family} saved to {args.dir}")
    return 0


def cmd_prefetch(args) -> int:
    from artaug.hub import Fetch, ensure_online, models_of, prefetch

    cfg = load(args)
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


def cmd_convert(args) -> int:
    from artaug.scorers.base import convert_to_safetensors

    if not args.target.endswith(".safetensors"):
        raise ConvertTargetError(f"{args.target}: the target must end in .safetensors")
    count = convert_to_safetensors(args.source, args.target)
    print(f"{count} tensors written to {args.target}")
    return 0
