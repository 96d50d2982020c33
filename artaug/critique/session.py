"""One warm critic engine for a whole run: vLLM's OpenAI-compatible server inside a Ray actor.

`ray.data.llm` starts a cold engine for every dataset it runs; a run of several rounds (and a judge
on the same model) would pay that start each time, minutes for a 72B model. The session starts the
server once, in an actor that Ray places where the engine's resources are (a GPU node on a cluster),
and each critique stage talks to it through the `openai` backend.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import socket
import tempfile

import ray

from artaug.cluster import cluster_has_gpus
from artaug.config import CritiqueConfig

log = logging.getLogger(__name__)


@ray.remote
class _CriticServer:
    """Owns the server process; the process dies with the actor (see start_server)."""

    def __init__(self, cfg: CritiqueConfig):
        from artaug.critique.server import start_server
        from artaug.stages.critique import critic_model

        self.model = critic_model(cfg)
        self.log_path = os.path.join(tempfile.mkdtemp(prefix="artaug-critic-"), "server.log")
        host = ray.util.get_node_ip_address()
        self.process, self.base_url = start_server(self.model, cfg, host, _free_port(host), self.log_path)

    def wait_ready(self, timeout_s: float) -> tuple[str, str]:
        from artaug.critique.server import wait_ready

        wait_ready(self.process, self.base_url, timeout_s, self.log_path)
        return self.base_url, self.model

    def stop(self) -> None:
        from artaug.critique.server import stop_server

        stop_server(self.process)


class CriticSession:
    """Starts the engine on first use (or early, with `start`), hands out its URL, stops it at the end."""

    def __init__(self, cfg: CritiqueConfig, ready_timeout_s: float = 1800):
        from artaug.stages.critique import critic_model

        self.cfg = cfg
        self.model = critic_model(cfg)  # a hub id, or a local folder (the tiny VLM is built here)
        self.ready_timeout_s = ready_timeout_s
        self._actor = None
        self._ready: tuple[str, str] | None = None

    @staticmethod
    def applies(cfg: CritiqueConfig, enabled: bool) -> bool:
        """A persistent engine replaces per-stage engines only for the vllm critic with one engine."""
        return enabled and cfg.backend == "vllm" and cfg.engines == 1

    def start(self) -> None:
        """Begin starting the engine without waiting (it loads while other stages run)."""
        if self._actor is not None:
            return
        gpus = self.cfg.tensor_parallel_size if cluster_has_gpus() else 0
        options = {"num_cpus": 1, "num_gpus": gpus}
        if gpus and self.cfg.accelerator_type:
            options["accelerator_type"] = self.cfg.accelerator_type
        log.info("starting one critic engine for the run (%s GPU(s))", gpus)
        self._actor = _CriticServer.options(**options).remote(dataclasses.replace(self.cfg, model=self.model))

    def critique_config(self) -> CritiqueConfig:
        """The critic settings that route requests to the warm engine."""
        base_url, _ = self._wait()
        return dataclasses.replace(self.cfg, backend="openai", base_url=base_url)

    @property
    def base_url(self) -> str:
        return self._wait()[0]

    def close(self) -> None:
        if self._actor is None:
            return
        try:
            ray.get(self._actor.stop.remote(), timeout=60)
        except Exception as err:  # noqa: BLE001 - the actor is killed below either way
            log.warning("critic engine did not stop cleanly: %s", err)
        ray.kill(self._actor)
        self._actor, self._ready = None, None

    def _wait(self) -> tuple[str, str]:
        self.start()
        if self._ready is None:
            self._ready = ray.get(self._actor.wait_ready.remote(self.ready_timeout_s))
            log.info("critic engine ready at %s (%s)", *self._ready)
        return self._ready


def _free_port(host: str) -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]
