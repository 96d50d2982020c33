"""Sections for the cluster, the synthesis model, generation, enhancement and serving.

The defaults are the `tiny` CPU recipe: tiny random models, a private local Ray, no downloads.
"""

from __future__ import annotations

from dataclasses import field
from typing import Annotated, Literal

from pydantic import Field, model_validator

from artaug.config.base import (
    Bool,
    Count,
    Float,
    Gpus,
    Int,
    Name,
    NodeLabels,
    NonNegativeFloat,
    NonNegativeInt,
    OddSize,
    PositiveFloat,
    Seed,
    Side,
    Text,
    Texts,
    section,
)
from artaug.config.messages import Invalid, Why

Device = Literal["auto", "cpu", "cuda"]
_PromptChars = Annotated[Int, Field(ge=1, le=100_000), Why("request bodies are capped at 1 MiB")]


@section
class Resources:
    gpus: Gpus = -1.0
    """GPUs Ray reserves per process; -1 means 1 when the cluster has GPUs, else 0."""
    cpus: PositiveFloat = 1.0
    """CPUs Ray reserves per process."""
    torch_threads: Count = 1
    """torch intra-op threads per process (on CPU keep processes x threads <= cores)."""
    node_labels: NodeLabels = field(default_factory=list)
    """Ray node labels ("key=value") the processes require; empty means any node."""


def cpu_only() -> Resources:
    """The default of every actor pool: the tiny recipe never asks Ray for a GPU."""
    return Resources(gpus=0.0)


@section
class RayConfig:
    address: Text = "local"
    """Ray cluster to join: "local" starts a private local Ray; "auto" or ray://host:port joins one."""
    num_cpus: Count = 4
    """Logical CPUs of a local Ray (may exceed the cores so small actors do not starve each other)."""
    object_store_gb: PositiveFloat = 1.0
    """Object store size of a local Ray, in GiB."""
    include_dashboard: Bool = False
    """Start the Ray dashboard with a local Ray."""
    shared_filesystem: Bool = False
    """Local output paths are on a file system mounted at the same path on every node (NFS, EFS, ...)."""


@section
class HubConfig:
    cache_dir: Text = ""
    """Hugging Face cache `artaug models prefetch` fills and runs read (HF_HUB_CACHE); empty: HF's default."""
    offline: Bool = False
    """Read model weights only from the cache, never the network (HF_HUB_OFFLINE=1); set after prefetch."""
    connect_timeout_s: PositiveFloat = 10.0
    """Seconds `artaug models prefetch` waits for the hub to answer before failing."""


@section
class ModelConfig:
    source: Name = "tiny"
    """Synthesis model: a hub id, a local folder saved by save_pretrained, "tiny" (random, built in memory),
    "world" (the miniature world's model, shipped) or "flux-dev-shapes" (FLUX.1-dev's widths, random)."""
    revision: Text = ""
    """Hub revision (commit or tag) to pin; empty means the default branch."""
    loras: Texts = field(default_factory=list)
    """LoRA safetensors files fused into the weights on load, in order (round k: rounds 1..k-1)."""
    lora_scale: Float = 1.0
    """Scale applied to every fused LoRA."""
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "float32"
    """Weights dtype: "auto" (bf16 on GPU, fp32 on CPU), "float32", "bfloat16" or "float16"."""
    device: Device = "cpu"
    """Device the code runs on: "auto" (CUDA when torch sees a GPU, else CPU), "cpu" or "cuda"."""
    max_sequence_length: Annotated[Int, Field(ge=1, le=512), Why("FLUX's T5 limit")] = 64
    """T5 token budget per prompt; longer prompts are truncated with a recorded warning."""
    tiny_seed: Int = 0
    """Seed of the randomly initialised weights when source is "tiny" or "flux-dev-shapes"."""
    cache_dir: Text = "~/.cache/artaug"
    """Where source "flux-dev-shapes" is built once (~2 GB of bf16 weights) and read by every process."""


@section
class GenerateConfig:
    width: Side = 64
    """Image width in pixels: a positive multiple of 16, at most max_side."""
    height: Side = 64
    """Image height in pixels: a positive multiple of 16, at most max_side."""
    steps: Count = 4
    """Denoising steps."""
    guidance: NonNegativeFloat = 3.5
    """Distilled guidance scale (FLUX.1-dev's guidance embedding)."""
    seed: Seed = 0
    """Base seed: a prompt without its own seed gets base seed + its line index."""
    max_side: Annotated[Int, Field(ge=16)] = 256
    """Largest width or height accepted, in pixels."""
    max_steps: Annotated[Int, Field(ge=1, le=10_000)] = 200
    """Most denoising steps a prompt file's row (or `steps`) may ask for."""
    max_guidance: Annotated[Float, Field(ge=0, le=1000)] = 100.0
    """Largest guidance a prompt file's row (or `guidance`) may ask for."""
    batch_size: Count = 4
    """Prompts per generation call within one actor (rows with equal settings are batched)."""
    num_actors: Count = 2
    """Synthesis hosts (model replicas kept warm for the run: generate, enhance, evaluation)."""
    blocks: NonNegativeInt = 0
    """Ray Data blocks the prompts are split into; 0: 4 per actor, more if one would exceed block_rows."""
    # A block's images reach the object store only when the whole block is done: without a cap the
    # store's peak grows with the number of prompts (12.6x for 16x, docs/benchmarks.md "Scale").
    block_rows: Count = 64
    """With blocks 0, most prompts per block (at 1024x1024 ~100 MB of PNGs), so memory stays flat."""
    resources: Resources = field(default_factory=cpu_only)
    """Ray resources of each generation and enhancement actor (one model replica each)."""

    @model_validator(mode="after")
    def _within_max_side(self) -> GenerateConfig:
        for name in ("width", "height"):
            value = getattr(self, name)
            if value > self.max_side:
                raise Invalid(f"is above generate.max_side ({self.max_side})", value, name)
        if self.steps > self.max_steps:
            raise Invalid(f"is above generate.max_steps ({self.max_steps})", self.steps, "steps")
        if not self.guidance <= self.max_guidance:  # also refuses NaN and infinity
            raise Invalid(f"is above generate.max_guidance ({self.max_guidance})", self.guidance, "guidance")
        return self


@section
class EnhanceConfig:
    mode: Literal["regional", "img2img", "photometric"] = "regional"
    """How suggestions become an enhanced image: "regional", "img2img" or "photometric"."""
    mask_scale: PositiveFloat = 1.0
    """s_i: weight of each regional prediction under its mask (regional mode)."""
    mask_coverage: Literal["fraction", "binary"] = "fraction"
    """Mask before the blur: "fraction" (of each token covered) or "binary" (edges snapped to tokens)."""
    blur_kernel: OddSize = 3
    """Gaussian blur kernel of region masks, in latent tokens of 16x16 pixels; 1 means no blur."""
    blur_sigma: NonNegativeFloat = 1.0
    """Gaussian blur sigma of region masks, in latent tokens."""
    max_regions: NonNegativeInt = 4
    """Regions used per image at most (each costs one more transformer evaluation per step)."""
    global_prompt: Literal["original", "rewritten", "folded"] = "original"
    """Global prompt: "original", "rewritten" (the critic's, if any) or "folded" (original + adjustments)."""
    img2img_strength: Annotated[Float, Field(gt=0, le=1)] = 0.6
    """How far img2img departs from the original image (0 keeps it, 1 ignores it)."""
    photometric_step: PositiveFloat = 0.08
    """Change per strength unit of an adjustment in photometric mode (e.g. +8% exposure)."""


@section
class ServeConfig:
    host: Name = "127.0.0.1"
    """Address the HTTP server binds to (127.0.0.1: this machine only; 0.0.0.0 only behind a firewall)."""
    port: Annotated[Int, Field(ge=1, le=65535)] = 8000
    """HTTP port of `artaug serve`."""
    app_name: Name = "artaug"
    """Ray Serve application name (one fused model per application)."""
    model_name: Name = "artaug"
    """Model id clients pass as `model` and GET /v1/models lists; requests naming another are refused."""
    min_replicas: NonNegativeInt = 1
    """Fewest model replicas the autoscaler keeps."""
    max_replicas: Int = 1
    """Most model replicas the autoscaler starts."""
    target_ongoing_requests: PositiveFloat = 2.0
    """Ongoing requests per replica the autoscaler aims for."""
    max_ongoing_requests: Int = 8
    """Requests one model replica works on or batches at once (at least max_batch_size)."""
    max_queued_requests: Annotated[Int, Field(ge=0), Why("an unbounded queue is not offered")] = 32
    """Requests waiting for a replica; beyond this the server answers 503 with Retry-After."""
    retry_after_s: NonNegativeInt = 1
    """Seconds a client is told to wait (Retry-After) when the queue is full."""
    max_batch_size: Count = 4
    """Most images per batched pipeline call (same size, steps and guidance); 1 turns batching off."""
    batch_wait_timeout_s: NonNegativeFloat = 0.005
    """Longest wait for more requests to fill a batch, in seconds."""
    request_timeout_s: PositiveFloat = 60.0
    """Longest a request may take, queueing included; a request may ask for less (`timeout`). Then 504."""
    max_side: Side = 256
    """Largest width or height a request may ask for, in pixels (a multiple of 16)."""
    max_n: Count = 4
    """Most images one request may ask for."""
    max_steps: Count = 50
    """Most denoising steps a request may ask for."""
    max_prompt_chars: _PromptChars = 2000
    """Longest prompt accepted, in characters."""
    max_request_cost: Annotated[Int, Field(ge=256)] = 4 * 1024 * 1024 * 50
    """Most work one request may ask for, n x width x height x steps (default: 4 of 1024x1024, 50 steps)."""
    api_key_env: Annotated[Name, Field(pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")] = "ARTAUG_API_KEY"
    """Environment variable holding the API key (Authorization: Bearer); unset or empty: the API is open."""
    resources: Resources = field(default_factory=cpu_only)
    """Ray resources of each model replica."""
    enhance: Bool = False
    """Also serve POST /v1/images/enhance and `"enhance": true`, with a critic deployment (critique.*)."""
    critic_replicas: Count = 1
    """Critic replicas (with serve.enhance); for the vllm backend also the vLLM engines (Ray Serve LLM)."""
    critic_max_ongoing_requests: Count = 8
    """Critiques one critic replica works on or batches at once (critique.batch_size per batch)."""
    critic_resources: Resources = field(default_factory=cpu_only)
    """Ray resources of each critic replica (a vllm engine's GPUs: critique.tensor_parallel_size)."""

    @model_validator(mode="after")
    def _replicas_and_batches(self) -> ServeConfig:
        if self.max_replicas < max(1, self.min_replicas):
            problem = f"must be >= 1 and >= serve.min_replicas ({self.min_replicas})"
            raise Invalid(problem, self.max_replicas, "max_replicas")
        if self.max_ongoing_requests < self.max_batch_size:
            problem = f"must be >= serve.max_batch_size ({self.max_batch_size}) or batches never fill"
            raise Invalid(problem, self.max_ongoing_requests, "max_ongoing_requests")
        return self
