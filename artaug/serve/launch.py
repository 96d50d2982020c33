"""What to serve (a run's combined LoRA, an explicit LoRA, or the base model) and `artaug serve` itself.

artaug serve runs/demo                      # RUN_DIR/run.yaml + RUN_DIR/lora/combined.safetensors
artaug serve --lora my.safetensors --port 8080
artaug serve                                # the base model of the preset
"""

from __future__ import annotations

import dataclasses
import logging
import os
import signal
import threading

import ray
from ray import serve

from artaug import storage
from artaug.cluster import init_ray
from artaug.config import ModelConfig, RunConfig, load_config
from artaug.hub import apply, looks_local
from artaug.lora.files import check_finite
from artaug.models.lineage import enhanced_model
from artaug.models.synthesis import check_source
from artaug.serve.app import build_app
from artaug.serve.sources import check_safetensors, check_sources

log = logging.getLogger(__name__)

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


def resolve_config(
    run_dir: str | None = None,
    lora: str | None = None,
    preset: str | None = None,
    config_path: str | None = None,
    overrides: list[str] | tuple = (),
    default_preset: str = "tiny",
) -> RunConfig:
    """The resolved config of the model to serve (`default_preset` as config.load_config has it).

    With `run_dir`, settings start from the run's own run.yaml and the model is the run's enhanced
    model (`enhanced_model`: the configured model plus the run's combined LoRA); until the run has a
    combined LoRA, the base model is served (and the log says so). With `lora`, that file is fused
    into the configured model the same way.
    """
    layout = check_sources(run_dir, lora, config_path)
    if layout is not None:
        config_path = layout.run_yaml
    cfg = load_config(preset, config_path, overrides, default_preset=default_preset)
    apply(cfg.hub)  # before Ray starts here: its workers inherit the setting (artaug.cluster)
    model = cfg.model
    if layout is not None:
        if storage.exists(layout.combined_lora):
            model = enhanced_model(model, layout.combined_lora)
        else:
            log.warning(
                "%s has no combined LoRA yet (%s): serving the base model %s",
                run_dir,
                layout.combined_lora,
                model.source,
            )
    if lora:
        model = enhanced_model(model, lora)
    model = _absolute_paths(model)
    for path in model.loras:  # the run's and the config's LoRAs too
        check_safetensors(path)
        check_finite(path)  # refused here, before Ray starts, not in every replica
    return dataclasses.replace(cfg, model=model)


def _absolute_paths(model: ModelConfig) -> ModelConfig:
    """Replicas may start in another working directory (or on another node): local paths made absolute."""
    source = model.source
    if source != "tiny" and looks_local(source):
        source = os.path.abspath(os.path.expanduser(source))
    loras = [p if storage.is_uri(p) else os.path.abspath(os.path.expanduser(p)) for p in model.loras]
    return dataclasses.replace(model, source=source, loras=loras)


def describe_model(cfg: RunConfig) -> str:
    loras = ", ".join(os.path.basename(path) for path in cfg.model.loras) or "no LoRA"
    return f"{cfg.model.source} + {loras}"


def serve_locally(cfg: RunConfig, stop: threading.Event | None = None) -> None:
    """Start Ray (or join cfg.ray.address), deploy the app, print the URL, run until stopped.

    SIGINT and SIGTERM (or `stop`, for callers in other threads) end it: the application is deleted
    (in-flight requests finish first), Serve shuts down and this driver leaves Ray (a Ray it started
    itself stops with it). The signal handlers in place before are restored on return.
    """
    check_source(cfg.model)
    stop = stop or threading.Event()
    on_main_thread = threading.current_thread() is threading.main_thread()
    previous = {sig: signal.getsignal(sig) for sig in STOP_SIGNALS} if on_main_thread else {}

    def catch_stop_signals() -> None:
        if on_main_thread:  # Python runs signal handlers there only; other callers have `stop`
            for sig in STOP_SIGNALS:
                signal.signal(sig, lambda *_: stop.set())

    catch_stop_signals()
    try:
        init_ray(cfg.ray)
        # ray.init replaces this process's SIGTERM handler with its own (sys.exit(15)), and Ray's core
        # worker puts a C++ one in front of it (it prints "*** SIGTERM received ... ***"): SIGTERM
        # would unwind the driver past the graceful stop below and abort it. Take the signals back.
        catch_stop_signals()
        serve.start(http_options={"host": cfg.serve.host, "port": cfg.serve.port})
        serve.run(build_app(cfg), name=cfg.serve.app_name, route_prefix="/", blocking=False)
        catch_stop_signals()
        url = f"http://{cfg.serve.host}:{cfg.serve.port}"
        print(
            f"serving {cfg.serve.model_name} ({describe_model(cfg)}) at {url}/v1/images/generations\n"
            f"  docs: {url}/docs   health: {url}/healthz   stop: Ctrl-C or SIGTERM",
            flush=True,
        )
        stop.wait()
        print("stopping: finishing in-flight requests", flush=True)
        serve.delete(cfg.serve.app_name)
    finally:
        serve.shutdown()
        ray.shutdown()
        for sig, handler in previous.items():
            if handler is not None:  # None: a handler not set from Python, which cannot be restored
                signal.signal(sig, handler)
    print("stopped", flush=True)
