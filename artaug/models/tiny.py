"""A tiny, randomly initialised FLUX pipeline built from configs: no downloads, ~0.3M parameters.

It has FLUX.1-dev's structure (double and single stream blocks, guidance embedding, a 16-channel
VAE with an 8x downsampling, CLIP and T5 text encoders, the FLUX.1-dev scheduler config), so every
code path that runs on FLUX.1-dev runs on it, on one CPU thread in tens of milliseconds per image.
Weights are a pure function of `seed`. Tokenizers are built in memory (character-level vocabularies).

    artaug models build-tiny ./tiny-flux
"""

from __future__ import annotations

import string

import torch
from diffusers import (
    AutoencoderKL,
    FlowMatchEulerDiscreteScheduler,
    FluxPipeline,
    FluxTransformer2DModel,
)
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from tokenizers.processors import TemplateProcessing
from transformers import (
    CLIPTextConfig,
    CLIPTextModel,
    PreTrainedTokenizerFast,
    T5Config,
    T5EncoderModel,
)

from artaug.models.cache import build_once
from artaug.models.patch_vae import PatchAutoencoder
from artaug.models.tiny_pretrain import pretrain

TEXT_WIDTH = 32  # CLIP hidden size == T5 d_model == the transformer's joint/pooled dims
CLIP_MAX_TOKENS = 77
CHARACTERS = string.ascii_letters + string.digits + string.punctuation + " "

# The scheduler values FLUX.1-dev ships with (dynamic shifting by image sequence length).
FLUX_DEV_SCHEDULER = dict(
    num_train_timesteps=1000,
    shift=3.0,
    use_dynamic_shifting=True,
    base_shift=0.5,
    max_shift=1.15,
    base_image_seq_len=256,
    max_image_seq_len=4096,
)


def build_tiny_flux(seed: int = 0, vae: str = "kl") -> FluxPipeline:
    """The tiny pipeline in float32 on CPU; the same seed gives the same weights.

    `vae="patch"` swaps the random AutoencoderKL for the colour-preserving fixed patch transform
    (models/patch_vae.py); every other weight is the same as with the default.
    """
    if vae not in ("kl", "patch"):
        raise ValueError(f"tiny vae must be kl or patch (got {vae!r})")
    torch.manual_seed(seed)
    transformer = FluxTransformer2DModel(
        patch_size=1,
        in_channels=64,  # 4 x the VAE's 16 latent channels: FLUX packs 2x2 latent patches
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=TEXT_WIDTH,
        pooled_projection_dim=TEXT_WIDTH,
        guidance_embeds=True,
        axes_dims_rope=(4, 6, 6),  # must sum to attention_head_dim
    )
    autoencoder = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(8, 8, 8, 8),  # four levels: 8x downsampling as in FLUX
        layers_per_block=1,
        latent_channels=16,
        norm_num_groups=4,
        sample_size=64,
        scaling_factor=0.3611,
        shift_factor=0.1159,
        use_quant_conv=False,
        use_post_quant_conv=False,
    )
    clip_tokenizer = char_tokenizer(bos="<|startoftext|>", eos="<|endoftext|>", pad="<|endoftext|>")
    t5_tokenizer = char_tokenizer(eos="</s>", pad="<pad>", unk="<unk>")
    text_encoder, text_encoder_2 = text_encoders(clip_tokenizer, t5_tokenizer)
    if vae == "patch":
        autoencoder = PatchAutoencoder(scaling_factor=0.25)  # flat colours: DC latents within about +-2
    return FluxPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(**FLUX_DEV_SCHEDULER),
        vae=autoencoder.eval(),
        text_encoder=text_encoder,
        tokenizer=clip_tokenizer,
        text_encoder_2=text_encoder_2,
        tokenizer_2=t5_tokenizer,
        transformer=transformer.eval(),
    )


def text_encoders(clip_tokenizer, t5_tokenizer) -> tuple[CLIPTextModel, T5EncoderModel]:
    """The tiny CLIP and T5 text encoders for these tokenizers, drawn from torch's current RNG state."""
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(clip_tokenizer),
            hidden_size=TEXT_WIDTH,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=2,
            max_position_embeddings=CLIP_MAX_TOKENS,
            projection_dim=TEXT_WIDTH,
            bos_token_id=clip_tokenizer.bos_token_id,
            eos_token_id=clip_tokenizer.eos_token_id,
            pad_token_id=clip_tokenizer.pad_token_id,
        )
    )
    text_encoder_2 = T5EncoderModel(
        T5Config(
            vocab_size=len(t5_tokenizer),
            d_model=TEXT_WIDTH,
            d_kv=16,
            d_ff=64,
            num_layers=1,
            num_heads=2,
            relative_attention_num_buckets=8,
            pad_token_id=t5_tokenizer.pad_token_id,
            eos_token_id=t5_tokenizer.eos_token_id,
        )
    )
    return text_encoder.eval(), text_encoder_2.eval()


def char_tokenizer(eos: str, pad: str, bos: str | None = None, unk: str = "<unk>", words=None):
    """A character-level fast tokenizer; BOS/EOS are added as CLIP and T5 expect.

    With `words`, a word-level one instead: each of those words (and each punctuation mark) is one
    token, anything else is unknown (the miniature world's model reads its vocabulary this way).
    """
    specials = list(dict.fromkeys(t for t in (bos, eos, pad, unk) if t))
    pieces = list(CHARACTERS) if words is None else [*dict.fromkeys(words), *string.punctuation]
    vocab = {token: i for i, token in enumerate(specials + pieces)}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token=unk))
    if words is None:
        core.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")
        core.decoder = decoders.Fuse()
    else:
        core.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()]
        )
        core.decoder = decoders.WordPiece()
    single = f"{bos} $A {eos}" if bos else f"$A {eos}"
    core.post_processor = TemplateProcessing(
        single=single, special_tokens=[(t, vocab[t]) for t in (bos, eos) if t]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=core,
        bos_token=bos,
        eos_token=eos,
        pad_token=pad,
        unk_token=unk,
        model_max_length=CLIP_MAX_TOKENS if bos else 512,
    )


def save_tiny_flux(directory: str, seed: int = 0, vae: str = "kl", pretrain_steps: int = 0) -> str:
    """Build (and optionally pretrain on drawn shapes, models/tiny_pretrain.py) and save the tiny
    pipeline with save_pretrained; returns the directory."""
    pipe = build_tiny_flux(seed, vae)
    if pretrain_steps:
        pretrain(pipe, pretrain_steps, seed=seed)
    pipe.save_pretrained(directory, safe_serialization=True)
    return directory


def cached_tiny_flux(cache_dir: str, seed: int = 0, vae: str = "kl", pretrain_steps: int = 0) -> str:
    """The folder of `save_tiny_flux(...)` under `cache_dir`, built once (pretraining costs minutes)."""
    name = f"tiny-flux-{vae}-pretrain{pretrain_steps}-seed{seed}"
    build = lambda folder: save_tiny_flux(folder, seed, vae, pretrain_steps)  # noqa: E731
    return build_once(cache_dir, name, build, marker="model_index.json")
