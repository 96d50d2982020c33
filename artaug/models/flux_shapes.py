"""FLUX.1-dev at its published widths, depth cut, random weights: the real shapes on a CPU.

The tiny FLUX (models/tiny.py) has FLUX's structure at widths of 16-64, so bugs that only show at
real shapes (the 16-channel VAE at 512 channels wide, 1024-pixel packing, T5's 512 tokens, the
guidance embedding, bf16, gradient checkpointing at width 3072) would first be met on a GPU cluster.
`model.source: flux-dev-shapes` builds every component from FLUX.1-dev's published configuration
(the `FLUX_DEV_*` values below: black-forest-labs/FLUX.1-dev's transformer, text_encoder,
text_encoder_2 and vae config.json) with only the depth cut: one double-stream and one single-stream
block, one CLIP-L layer, one T5-XXL layer, and one resnet per VAE level instead of two. Widths,
heads, vocabularies, the 16 latent channels, the VAE's scaling and shift factors, the guidance
embedding and the tokenizers' lengths (CLIP 77, T5 512) are FLUX.1-dev's. Tokenizers are the tiny
model's in-memory character-level ones (the embedding tables keep the real vocabulary sizes).

About 0.98 B parameters: built once into `cache_dir` (models/cache.py) and saved in bfloat16 (~2 GB,
the dtype FLUX.1-dev's weights are published in), read from there by every process.
`flux_dev_modules(full=True)` builds the uncut modules on any device, e.g. PyTorch's meta device to
count parameters without memory (benchmarks/flux_memory_plan.py).
"""

from __future__ import annotations

import torch
from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

from artaug.models.cache import build_once
from artaug.models.tiny import CLIP_MAX_TOKENS, FLUX_DEV_SCHEDULER, char_tokenizer

SOURCE = "flux-dev-shapes"
T5_MAX_TOKENS = 512  # FLUX.1-dev's tokenizer_2 model_max_length and its pipeline's max_sequence_length

# black-forest-labs/FLUX.1-dev transformer/config.json (diffusers' FluxTransformer2DModel defaults).
FLUX_DEV_TRANSFORMER = dict(
    patch_size=1,
    in_channels=64,
    num_layers=19,
    num_single_layers=38,
    attention_head_dim=128,
    num_attention_heads=24,
    joint_attention_dim=4096,
    pooled_projection_dim=768,
    guidance_embeds=True,
    axes_dims_rope=(16, 56, 56),
)
# text_encoder/config.json: CLIP ViT-L/14's text tower.
FLUX_DEV_CLIP = dict(
    vocab_size=49408,
    hidden_size=768,
    intermediate_size=3072,
    num_hidden_layers=12,
    num_attention_heads=12,
    max_position_embeddings=CLIP_MAX_TOKENS,
    projection_dim=768,
    hidden_act="quick_gelu",
)
# text_encoder_2/config.json: T5 v1.1 XXL's encoder.
FLUX_DEV_T5 = dict(
    vocab_size=32128,
    d_model=4096,
    d_kv=64,
    d_ff=10240,
    num_layers=24,
    num_heads=64,
    feed_forward_proj="gated-gelu",
    relative_attention_num_buckets=32,
    relative_attention_max_distance=128,
    layer_norm_epsilon=1e-6,
    tie_word_embeddings=False,
)
# vae/config.json: the 16-channel autoencoder, 8x downsampling.
FLUX_DEV_VAE = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    block_out_channels=(128, 256, 512, 512),
    layers_per_block=2,
    latent_channels=16,
    norm_num_groups=32,
    sample_size=1024,
    scaling_factor=0.3611,
    shift_factor=0.1159,
    use_quant_conv=False,
    use_post_quant_conv=False,
    force_upcast=True,
)
# The depth cut of `flux-dev-shapes`: every width above is kept.
CUT = {
    "transformer": dict(num_layers=1, num_single_layers=1),
    "text_encoder": dict(num_hidden_layers=1),
    "text_encoder_2": dict(num_layers=1),
    "vae": dict(layers_per_block=1),
}


def flux_dev_modules(full: bool, clip_tokens: dict | None = None, t5_tokens: dict | None = None) -> dict:
    """FLUX.1-dev's four modules, uncut (`full`) or cut to `CUT`'s depth, on torch's current device
    and from its current RNG; `*_tokens` are the tokenizers' special token ids for the text configs."""
    cut = {name: ({} if full else depth) for name, depth in CUT.items()}
    clip = CLIPTextConfig(**FLUX_DEV_CLIP | cut["text_encoder"], **(clip_tokens or {}))
    t5 = T5Config(**FLUX_DEV_T5 | cut["text_encoder_2"], **(t5_tokens or {}))
    return {
        "transformer": FluxTransformer2DModel(**FLUX_DEV_TRANSFORMER | cut["transformer"]),
        "text_encoder": CLIPTextModel(clip),
        "text_encoder_2": T5EncoderModel(t5),
        "vae": AutoencoderKL(**FLUX_DEV_VAE | cut["vae"]),
    }


def build_flux_dev_shapes(seed: int = 0) -> FluxPipeline:
    """The cut FLUX.1-dev pipeline in float32 on CPU; the same seed gives the same weights."""
    return flux_dev_pipeline(full=False, seed=seed)


def flux_dev_pipeline(full: bool, seed: int = 0) -> FluxPipeline:
    """A FluxPipeline of `flux_dev_modules` with the character-level tokenizers, built on torch's
    current device and default dtype (benchmarks/flux_gpu_memory.py builds it uncut on a GPU)."""
    clip_tokenizer = char_tokenizer(bos="<|startoftext|>", eos="<|endoftext|>", pad="<|endoftext|>")
    t5_tokenizer = char_tokenizer(eos="</s>", pad="<pad>", unk="<unk>")
    t5_tokenizer.model_max_length = T5_MAX_TOKENS
    ids = lambda t: {f"{k}_token_id": getattr(t, f"{k}_token_id") for k in ("bos", "eos", "pad")}  # noqa: E731
    torch.manual_seed(seed)
    modules = flux_dev_modules(full, ids(clip_tokenizer), ids(t5_tokenizer))
    return FluxPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(**FLUX_DEV_SCHEDULER),
        vae=modules["vae"].eval(),
        text_encoder=modules["text_encoder"].eval(),
        tokenizer=clip_tokenizer,
        text_encoder_2=modules["text_encoder_2"].eval(),
        tokenizer_2=t5_tokenizer,
        transformer=modules["transformer"].eval(),
    )


def cached_flux_dev_shapes(cache_dir: str, seed: int = 0) -> str:
    """The folder of the cut pipeline saved in bfloat16 with save_pretrained under `cache_dir`, built once."""

    def build(folder: str) -> None:
        build_flux_dev_shapes(seed).to(dtype=torch.bfloat16).save_pretrained(folder, safe_serialization=True)

    return build_once(cache_dir, f"{SOURCE}-v1-seed{seed}", build, marker="model_index.json")
