"""`artaug config show | fields`: the resolved configuration, and every field with its meaning."""

from __future__ import annotations

from artaug.cli.options import add_config_options, load
from artaug.config import describe, reference_markdown, to_yaml


def add_commands(commands) -> None:
    config = commands.add_parser("config", help="show the resolved configuration or its fields")
    sub = config.add_subparsers(title="config commands", required=True, metavar="COMMAND")
    show = sub.add_parser("show", help="print the resolved config as YAML")
    add_config_options(show)
    show.set_defaults(func=cmd_show)
    fields = sub.add_parser("fields", help="list every field with its default and meaning")
    fields.add_argument("--markdown", action="store_true", help="as the table in docs/configuration.md")
    fields.set_defaults(func=cmd_fields)


def cmd_show(args) -> int:
    print(to_yaml(load(args)), end="")
    return 0


def cmd_fields(args) -> int:
    if args.markdown:
        print(reference_markdown(), end="")
        return 0
    for name, default, doc in describe():
        print(f"{name} = {default}\n    {doc}")
    return 0
