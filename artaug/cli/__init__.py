"""The `artaug` command line. `artaug --help` lists the commands in data-flow order; each has --help.

Commands import their heavy modules (torch, Ray, diffusers) when they run, so `--help` is instant.
Every error a user can act on derives from `artaug.errors.ArtaugError`: it is printed as one line
and the exit code is 2. Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import logging
import sys

from artaug.cli import config, lora, models, run, serve, stages
from artaug.errors import ArtaugError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="artaug", description="ArtAug on Ray: make a text-to-image model more beautiful."
    )
    commands = parser.add_subparsers(title="commands", required=True, metavar="COMMAND")
    data_flow = (run.add_run, stages.add_round_stages, lora.add_commands, stages.add_evaluate, run.add_report,
                 serve.add_commands, models.add_commands, config.add_commands)  # fmt: skip
    for add in data_flow:
        add(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return args.func(args)
    except ArtaugError as err:
        print(f"artaug: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
