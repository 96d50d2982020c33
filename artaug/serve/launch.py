"""What to serve (a run's combined LoRA, an explicit LoRA, or the base model) and `artaug serve` itself.

artaug serve runs/demo                      # RUN_DIR/run.yaml + RUN_DIR/lora/combined.safetensors
artaug serve --lora my.safetensors --port 8080
artaug serve                                # the base model of the preset
"""

from __future__ import annotations

import logging
import os
import signal
import threading

from artaug import storage
from artaug.config import RunConfig, load_config
from artaug.models.synthesis import looks_local

log = logging.getLogger(__name__)

COMBINED_LORA = "lora/combined.safetensors"


class ServeSetupError(ValueError):
    """`artaug serve` was pointed at something it will not load (no run.yaml, a non-safetensors LoRA)."""


def resolve_config(
    run_dir: str | None = None,
    lora: str | None = None,
    preset: str | None = None,
    config_path: str | None = None,
    overrides: list[str] | tuple = (),
) -> RunConfig:
    """The resolved config of the model to serve.

    With `run_dir`, settings start from the run's own run.yaml and the run's combined LoRA is fused
    on top of the LoRAs the run started from; until the run has one, the base model is served (and
    the log says so). With `lora`, that file is fused into the configured model.
    """
    if run_dir and config_path:
        raise ServeSetupError("give either RUN_DIR (its run.yaml is the config) or --config, not both")
    if run_dir and lora:
        raise ServeSetupError("give either RUN_DIR (its combined LoRA is served) or --lora, not both")
    if run_dir:
        run_yaml = storage.join(run_dir, "run.yaml")
        if not storage.exists(run_yaml):
            raise ServeSetupError(f"{run_dir} is not a run directory: {run_yaml} does not exist")
        config_path = run_yaml
    cfg = load_config(preset=preset, path=config_path, overrides=overrides)
    if run_dir:
        combined = storage.join(run_dir, COMBINED_LORA)
        if storage.exists(combined):
            cfg.model.loras = [*cfg.model.loras, combined]
        else:
            log.warning(
                "%s has no %s yet: serving the base model %s", run_dir, COMBINED_LORA, cfg.model.source
            )
    if lora:
        if not storage.exists(lora):
            raise ServeSetupError(f"--lora: file {lora!r} does not exist")
        cfg.model.loras = [*cfg.model.loras, lora]
    # Replicas may start in another working directory (or on another node): pass absolute paths.
    if looks_local(cfg.model.source):
        cfg.model.source = os.path.abspath(os.path.expanduser(cfg.model.source))
    cfg.model.loras = [
        p if storage.is_uri(p) else os.path.abspath(os.path.expanduser(p)) for p in cfg.model.loras
    ]
    for path in cfg.model.loras:
        # Only safetensors: other LoRA formats are pickles, which can run code when loaded.
        if not path.endswith(".safetensors"):
            raise ServeSetupError(f"LoRA {path!r} is not a .safetensors file; only safetensors are loaded")
    return cfg.validate()


def describe_model(cfg: RunConfig) -> str:
    loras = ", ".join(os.path.basename(path) for path in cfg.model.loras) or "no LoRA"
    return f"{cfg.model.source} + {loras}"


def serve_locally(cfg: RunConfig, stop: threading.Event | None = None) -> None:
    """Start Ray (or join cfg.ray.address), deploy the app, print the URL, run until stopped.

    SIGINT and SIGTERM (or `stop`, for callers in other threads) end it: the application is deleted
    (in-flight requests finish first), Serve shuts down and this driver leaves Ray.
    """
    import ray
    from ray import serve

    from artaug.cluster import init_ray
    from artaug.models.synthesis import check_source
    from artaug.serve.app import build_app

    check_source(cfg.model)
    stop = stop or threading.Event()
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda *_: stop.set())
    s = cfg.serve
    init_ray(cfg.ray)
    try:
        serve.start(http_options={"host": s.host, "port": s.port})
        serve.run(build_app(cfg), name=s.app_name, route_prefix="/", blocking=False)
        url = f"http://{s.host}:{s.port}"
        print(
            f"serving {s.model_name} ({describe_model(cfg)}) at {url}/v1/images/generations\n"
            f"  docs: {url}/docs   health: {url}/healthz   stop: Ctrl-C",
            flush=True,
        )
        stop.wait()
        print("stopping: finishing in-flight requests", flush=True)
        serve.delete(s.app_name)
    finally:
        serve.shutdown()
        ray.shutdown()
    print("stopped", flush=True)
