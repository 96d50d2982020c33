"""`artaug serve` (the enhanced model over HTTP) and `artaug critic serve` (a long-lived critic)."""

from __future__ import annotations

from artaug.cli.options import DEFAULT_PRESET, add_config_options, alias, load

CRITIC_KEY_ENV = "ARTAUG_CRITIC_API_KEY"  # the key `artaug critic serve` requires, when set


def add_commands(commands) -> None:
    srv = commands.add_parser(
        "serve", help="serve a run's enhanced model over HTTP (POST /v1/images/generations)"
    )
    srv.add_argument("run_dir", nargs="?", help="run directory: its run.yaml and lora/combined.safetensors")
    srv.add_argument(
        "--lora", help="a LoRA .safetensors file to add to the configured model (without RUN_DIR)"
    )
    add_config_options(srv)
    alias(srv, "--host", "serve.host")
    alias(srv, "--port", "serve.port", type=int)
    srv.set_defaults(func=cmd_serve)

    critic = commands.add_parser("critic", help="a long-lived critic server")
    sub = critic.add_subparsers(title="critic commands", required=True, metavar="COMMAND")
    serve_critic = sub.add_parser("serve", help="start vLLM's OpenAI-compatible server for a VLM")
    serve_critic.add_argument(
        "model", nargs="?", help='hub id, local folder or "tiny" (default: critique.model)'
    )
    serve_critic.add_argument("--host", default="127.0.0.1", help="bind address (default 127.0.0.1)")
    serve_critic.add_argument("--port", type=int, default=8011, help="port (default 8011)")
    add_config_options(serve_critic)
    serve_critic.set_defaults(func=cmd_critic_serve)


def cmd_serve(args) -> int:
    """Runs until interrupted (Ctrl-C or SIGTERM); without RUN_DIR or --lora, serves the base model."""
    from artaug.serve.sources import check_sources

    check_sources(args.run_dir, args.lora, args.config)  # refused before Ray, torch and diffusers import
    from artaug.serve.launch import resolve_config, serve_locally

    flags = [
        f"{field}={getattr(args, dest)}"
        for dest, field in args.aliases.items()
        if getattr(args, dest) is not None
    ]
    cfg = resolve_config(run_dir=args.run_dir, lora=args.lora, preset=args.preset, config_path=args.config,
                         overrides=[*args.overrides, *flags], default_preset=DEFAULT_PRESET)  # fmt: skip
    serve_locally(cfg)
    return 0


def cmd_critic_serve(args) -> int:
    """Requires the key in $ARTAUG_CRITIC_API_KEY, when set, on every /v1 request."""
    import dataclasses
    import os
    import sys

    from artaug.critic.backends import critic_model
    from artaug.critic.server import start_server, stop_server, wait_ready

    cfg = load(args)
    critique = dataclasses.replace(cfg.critique, model=args.model) if args.model else cfg.critique
    model = critic_model(critique)
    key = os.environ.get(CRITIC_KEY_ENV, "")
    if not key and not _loopback(args.host):
        print(f"warning: {args.host} is reachable from other machines and {CRITIC_KEY_ENV} is not set:"
              " anyone who can reach it can use the critic", file=sys.stderr)  # fmt: skip
    process, url = start_server(model, critique, args.host, args.port, api_key=key or None)
    try:
        wait_ready(process, url)
        with_key = f" --set critique.api_key_env={CRITIC_KEY_ENV}" if key else ""
        print(f"critic ready at {url} ({model}); use it with --set critique.backend=openai"
              f" --set critique.base_url={url}{with_key}   (Ctrl-C stops it)", flush=True)  # fmt: skip
        return process.wait()
    except KeyboardInterrupt:
        return 0
    finally:
        stop_server(process)


def _loopback(host: str) -> bool:
    import ipaddress
    import socket

    try:
        return ipaddress.ip_address(socket.gethostbyname(host)).is_loopback
    except (OSError, ValueError):
        return False
