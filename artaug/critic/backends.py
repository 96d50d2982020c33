"""Building a critic: which model a backend loads, and asking it about request rows.

One dispatch serves every task put to an understanding model: the critique stage's critique task and
the evaluation's judge task (`artaug.critic.judge`). A task turns a request row into chat messages
and the JSON schema the answer must follow. Backends:

- heuristic, world, random, silent: no model (critique task only): generic pixel statistics, the
  miniature world's critic and its two controls (`artaug.critic.world_critic`);
- vllm: batch inference inside Ray Data (`ray.data.llm`), engines started for the dataset;
- openai: any OpenAI-compatible endpoint, e.g. `artaug critic serve` or the run's warm engine
  (`artaug.critic.engine`), whose URL and key are passed as `endpoint` without touching the user's
  config.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass

import pyarrow as pa
import ray

from artaug.config import BUILT_IN_VLMS, CritiqueConfig
from artaug.critic.answers import ANSWER, answer_row
from artaug.critic.heuristic import heuristic_critique
from artaug.critic.instruction import chat_messages
from artaug.critic.openai_backend import Endpoint, OpenAICritic
from artaug.critic.schema import SCHEMA_VERSION, critique_schema
from artaug.critic.vllm_backend import vllm_answers
from artaug.critic.world_critic import PIXEL_CRITICS
from artaug.errors import ArtaugError
from artaug.images import decode_data_url

# Critics that need no model, by critique.backend.
MODEL_FREE = {"heuristic": heuristic_critique, **PIXEL_CRITICS}


class CriticModelError(ArtaugError, ValueError):
    """The critic's model folder is not a model; the message names the path."""


@dataclass(frozen=True)
class Task:
    """What to ask: `request(row)` gives (chat messages, JSON schema of the answer); `name` labels the
    schema in structured-output requests."""

    name: str
    request: Callable[[dict], tuple[list[dict], dict]]


def critique_task(box_format: str) -> Task:
    """The critique: the image, the instruction with the box rule, the critique schema."""

    def request(row: dict) -> tuple[list[dict], dict]:
        messages = chat_messages(row["image_url"], row["prompt"], box_format)
        return messages, critique_schema(int(row["box_max"]))

    return Task(SCHEMA_VERSION, request)


def critic_model(cfg: CritiqueConfig, tiny_seed: int = 0) -> str:
    """The model a vllm backend loads: a hub id, a checked local folder, or the built tiny VLM."""
    if cfg.model in BUILT_IN_VLMS:
        from artaug.critic.tiny_vlm import ensure_tiny_vlm  # transformers' Qwen2-VL: seconds to import

        return ensure_tiny_vlm(cfg.cache_dir, seed=tiny_seed, family=cfg.model)
    local = os.path.expanduser(cfg.model)
    if cfg.model.startswith(("/", "./", "../", "~")) and not os.path.isfile(
        os.path.join(local, "config.json")
    ):
        raise CriticModelError(f"critique.model: {local!r} is not a model folder (no config.json)")
    return local if os.path.isdir(local) else cfg.model


def ask(
    ds: ray.data.Dataset, cfg: CritiqueConfig, task: Task, model: str, endpoint: Endpoint | None = None
) -> ray.data.Dataset:
    """Request rows (critic.answers.REQUEST) -> answer rows (ANSWER) through the configured backend,
    or through the OpenAI-compatible `endpoint` when one is given (a warm engine)."""
    if endpoint is not None or cfg.backend == "openai":
        return ds.map_batches(
            OpenAICritic,
            fn_constructor_kwargs={"cfg": cfg, "task": task, "endpoint": endpoint or Endpoint(cfg.base_url)},
            batch_format="pyarrow",
            batch_size=cfg.batch_size,
            compute=ray.data.ActorPoolStrategy(size=1),
            num_cpus=0.5,
        )
    if cfg.backend in MODEL_FREE:
        if task.name != SCHEMA_VERSION:
            raise CriticModelError(f"the {cfg.backend} critic answers critiques only, not {task.name}")
        return ds.map_batches(
            model_free_answers, fn_kwargs={"backend": cfg.backend}, batch_format="pyarrow",
            batch_size=cfg.batch_size,
        )  # fmt: skip
    return vllm_answers(ds, cfg, model, task.request)


def model_free_answers(batch: pa.Table, backend: str) -> pa.Table:
    critic, out = MODEL_FREE[backend], []
    for row in batch.to_pylist():
        start = time.perf_counter()
        raw = json.dumps(critic(decode_data_url(row["image_url"]), row["prompt"]))
        out.append(answer_row(row, raw, None, time.perf_counter() - start, backend))
    return pa.Table.from_pylist(out, schema=ANSWER)
