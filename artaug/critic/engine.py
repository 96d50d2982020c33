"""One warm critic engine for a whole run: vLLM's OpenAI-compatible server inside a Ray actor.

`ray.data.llm` starts a cold engine for every dataset it runs; a run of several rounds (and a judge
on the same model) would pay that start each time, minutes for a 72B model. A `WarmEngine` starts
the server once, in an actor that Ray places where the engine's resources are (a GPU node on a
cluster), and hands out its endpoint; stages ask it through the OpenAI protocol
(`artaug.critic.backends.ask(..., endpoint=...)`). The user's configuration is never rewritten.

Closed by default: the engine requires a key generated for the run (only the run's stages get it)
and, when the run's Ray is private to this machine, listens on loopback only. Before handing out
its endpoint the engine's health is checked; a dead engine is restarted once per run, a second
death fails the stage that asked.
"""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
import socket
import tempfile
import time

import ray
import requests

from artaug.cluster import cluster_has_gpus
from artaug.config import CritiqueConfig
from artaug.critic.openai_backend import Endpoint
from artaug.critic.server import health_url, start_server, stop_server, wait_ready
from artaug.errors import ArtaugError

log = logging.getLogger(__name__)
LOOPBACK = "127.0.0.1"


class CriticEngineError(ArtaugError, RuntimeError):
    """The run's critic engine died again after its one restart."""


@ray.remote
class _EngineServer:
    """Owns the server process; the process dies with the actor (see start_server)."""

    def __init__(self, cfg: CritiqueConfig, model: str, key: str, loopback: bool, launch=start_server):
        self.log_path = os.path.join(tempfile.mkdtemp(prefix="artaug-critic-"), "server.log")
        host = LOOPBACK if loopback else ray.util.get_node_ip_address()
        self.process, self.base_url = launch(model, cfg, host, _free_port(host), self.log_path, api_key=key)

    def wait_ready(self, timeout_s: float) -> str:
        wait_ready(self.process, self.base_url, timeout_s, self.log_path)
        return self.base_url

    def healthy(self) -> bool:
        if self.process.poll() is not None:
            return False
        try:
            return requests.get(health_url(self.base_url), timeout=10).status_code == 200
        except requests.RequestException:
            return False

    def where(self) -> str:
        return f"{ray.util.get_node_ip_address()}:{self.log_path}"

    def stop(self) -> None:
        stop_server(self.process)


class WarmEngine:
    """Starts the engine for `model` on first use (or early, with `start`) and stops it at `close`.

    `local`: the run's Ray is private to this machine, so the engine binds loopback. `launch` starts
    the server process (vLLM's, `critic.server.start_server`, unless a test needs a stand-in).
    """

    def __init__(self, cfg: CritiqueConfig, model: str, ready_timeout_s: float = 1800, local: bool = False,
                 launch=start_server):  # fmt: skip
        self.cfg, self.model = cfg, model  # model: a hub id or a local folder (critic_model's answer)
        self.ready_timeout_s, self.local, self.launch = ready_timeout_s, local, launch
        self.key = secrets.token_urlsafe(32)  # never logged or written; handed to the run's stages only
        self.restarts = 0
        self.held_s = self.busy_s = 0.0  # over the engine's life, restarts included (`usage`)
        self._actor = None
        self._url: str | None = None
        self._since: float | None = None  # when the engine now held was started

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
        self._actor = _EngineServer.options(**options).remote(
            self.cfg, self.model, self.key, self.local, self.launch
        )
        self._since = time.monotonic()

    @contextlib.contextmanager
    def busy(self):
        """Counts the block's time as the engine's work (a stage asking it), for `usage`."""
        started = time.monotonic()
        try:
            yield
        finally:
            self.busy_s += time.monotonic() - started

    def usage(self) -> dict:
        """Seconds held (from start to close, its loading included), seconds busy with a stage's
        requests, their ratio and the restarts: where a run's critic GPUs idle."""
        held = self.held_s + (time.monotonic() - self._since if self._since is not None else 0.0)
        return {"model": self.model, "held_s": round(held, 3), "busy_s": round(self.busy_s, 3),
                "busy_fraction": round(self.busy_s / held, 4) if held else None,
                "restarts": self.restarts}  # fmt: skip

    def endpoint(self) -> Endpoint:
        """The engine's endpoint (URL and key), once it answers. An engine found dead (it answered
        before) is restarted once per run; found dead again, it fails the stage that asked."""
        self.start()
        if self._url is not None and not self._healthy():
            if self.restarts:
                raise CriticEngineError(
                    f"the critic engine at {self._url} died again after a restart; its log is on"
                    f" {self._where()}. Fix the cause and resume the run"
                )
            log.warning("critic engine at %s is dead (log: %s); restarting it once", self._url, self._where())
            self.close()
            self.restarts += 1
            self.start()
        if self._url is None:
            self._url = ray.get(self._actor.wait_ready.remote(self.ready_timeout_s))
            log.info("critic engine ready at %s (%s)", self._url, self.model)
        return Endpoint(self._url, self.key)

    def _healthy(self) -> bool:
        try:
            return ray.get(self._actor.healthy.remote(), timeout=60)
        except (ray.exceptions.RayError, TimeoutError):  # the actor itself is gone or hangs
            return False

    def _where(self) -> str:
        try:
            return ray.get(self._actor.where.remote(), timeout=10)
        except (ray.exceptions.RayError, TimeoutError):
            return "a node that is gone"

    def close(self) -> None:
        if self._actor is None:
            return
        try:
            ray.get(self._actor.stop.remote(), timeout=60)
        except Exception as err:  # noqa: BLE001 - the actor is killed below either way
            log.warning("critic engine did not stop cleanly: %s", err)
        ray.kill(self._actor)
        self._actor, self._url = None, None
        self.held_s += time.monotonic() - self._since
        self._since = None


def _free_port(host: str) -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]
