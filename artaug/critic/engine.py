"""One warm critic engine for a whole run: vLLM's OpenAI-compatible server inside a Ray actor.

`ray.data.llm` starts a cold engine for every dataset it runs; a run of several rounds (and a judge
on the same model) would pay that start each time, minutes for a 72B model. A `WarmEngine` starts
the server once, in an actor that Ray places where the engine's resources are (a GPU node on a
cluster), and hands out its endpoint; stages ask it through the OpenAI protocol
(`artaug.critic.backends.ask(..., endpoint=...)`). The user's configuration is never rewritten.
"""

from __future__ import annotations

import logging
import os
import socket
import tempfile

import ray

from artaug.cluster import cluster_has_gpus
from artaug.config import CritiqueConfig
from artaug.critic.server import start_server, stop_server, wait_ready

log = logging.getLogger(__name__)


@ray.remote
class _EngineServer:
    """Owns the server process; the process dies with the actor (see start_server)."""

    def __init__(self, cfg: CritiqueConfig, model: str):
        self.log_path = os.path.join(tempfile.mkdtemp(prefix="artaug-critic-"), "server.log")
        host = ray.util.get_node_ip_address()
        self.process, self.base_url = start_server(model, cfg, host, _free_port(host), self.log_path)

    def wait_ready(self, timeout_s: float) -> str:
        wait_ready(self.process, self.base_url, timeout_s, self.log_path)
        return self.base_url

    def stop(self) -> None:
        stop_server(self.process)


class WarmEngine:
    """Starts the engine for `model` on first use (or early, with `start`) and stops it at `close`."""

    def __init__(self, cfg: CritiqueConfig, model: str, ready_timeout_s: float = 1800):
        self.cfg, self.model = cfg, model  # model: a hub id or a local folder (critic_model's answer)
        self.ready_timeout_s = ready_timeout_s
        self._actor = None
        self._url: str | None = None

    @staticmethod
    def applies(cfg: CritiqueConfig, enabled: bool) -> bool:
        """A warm engine replaces per-stage engines only for the vllm backend with one engine."""
        return enabled and cfg.backend == "vllm" and cfg.engines == 1

    def start(self) -> None:
        """Begin starting the engine without waiting (it loads while other stages run)."""
        if self._actor is not None:
            return
        gpus = self.cfg.tensor_parallel_size if cluster_has_gpus() else 0
        options = {"num_cpus": 1, "num_gpus": gpus}
        if gpus and self.cfg.accelerator_type:
            options["accelerator_type"] = self.cfg.accelerator_type
        log.info("starting one critic engine for the run (%s GPU(s)): %s", gpus, self.model)
        self._actor = _EngineServer.options(**options).remote(self.cfg, self.model)

    def endpoint(self) -> str:
        """The engine's OpenAI-compatible base URL, once it answers."""
        self.start()
        if self._url is None:
            self._url = ray.get(self._actor.wait_ready.remote(self.ready_timeout_s))
            log.info("critic engine ready at %s (%s)", self._url, self.model)
        return self._url

    def close(self) -> None:
        if self._actor is None:
            return
        try:
            ray.get(self._actor.stop.remote(), timeout=60)
        except Exception as err:  # noqa: BLE001 - the actor is killed below either way
            log.warning("critic engine did not stop cleanly: %s", err)
        ray.kill(self._actor)
        self._actor, self._url = None, None


def _free_port(host: str) -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]
