"""The miniature world's synthesis model: a small FLUX pretrained on rendered, captioned scenes.

Same structure as the tiny FLUX (models/tiny.py: random fixed character-level text encoders, the
colour-preserving patch autoencoder) with a wider transformer, pretrained with the training loop's
flow-matching objective on `artaug.world` scenes at 128x128. Each caption names the scene and,
each with probability one half, the word of each free attribute ("a red circle on blue, small,
dark"), so the model learns both what a word asks for and what to draw when no word is given (the
prior: every size, placement, exposure and contrast). A critique's words can therefore be carried
out by regenerating with them, and a LoRA can move what the bare prompt draws.

The transformer's weights ship with the package (artaug/models/world/, ~4 MB in float16), built by
`python scripts/build_world.py` (seeded: the same steps on the same torch give the same weights).
"""

from __future__ import annotations

import logging
import re
import time
from importlib import resources

import numpy as np
import torch
from diffusers import FluxTransformer2DModel
from safetensors.torch import load_file, save_file
from transformers.models.t5.modeling_t5 import T5Attention

from artaug import world
from artaug.models.flow_matching import flow_matching_loss
from artaug.models.tiny import TEXT_WIDTH, build_tiny_flux, char_tokenizer, text_encoders
from artaug.models.tiny_pretrain import encode_images

log = logging.getLogger(__name__)

WEIGHTS = "world/transformer.safetensors"
WORD_CHANCE = 0.5  # each attribute word appears in a caption with this probability


def world_transformer() -> FluxTransformer2DModel:
    """The world model's (untrained) transformer: two double- and two single-stream blocks, width 128.

    Width 64 (the packed latent's own size) was measured too narrow: the residual stream must carry
    the noise it predicts besides the picture, and samples came out as per-token texture."""
    return FluxTransformer2DModel(
        patch_size=1,
        in_channels=64,
        num_layers=2,
        num_single_layers=2,
        attention_head_dim=32,
        num_attention_heads=4,
        joint_attention_dim=TEXT_WIDTH,
        pooled_projection_dim=TEXT_WIDTH,
        guidance_embeds=True,
        axes_dims_rope=(8, 12, 12),
    )


def world_words() -> list[str]:
    """Every word a world caption can hold: the tokens of the world's word-level tokenizers."""
    phrases = ["a an on", *world.SHAPES, *world.COLOURS, *world.WORDS]
    return list(dict.fromkeys(w for phrase in phrases for w in re.findall(r"[a-z]+", phrase)))


def untrained_world_flux(previous_word: bool = True):
    """The world pipeline with an untrained transformer: the tiny FLUX's patch autoencoder, word-level
    tokenizers over the world's vocabulary and random fixed text encoders (seed 0); one token per
    word makes "red circle on blue" easy to bind for so small a model, where characters were not."""
    pipe = build_tiny_flux(0, vae="patch")
    clip_tokenizer = char_tokenizer(bos="<|startoftext|>", eos="<|endoftext|>", pad="<|endoftext|>",
                                    words=world_words())  # fmt: skip
    t5_tokenizer = char_tokenizer(eos="</s>", pad="<pad>", unk="<unk>", words=world_words())
    torch.manual_seed(0)
    text_encoder, text_encoder_2 = text_encoders(clip_tokenizer, t5_tokenizer)
    if previous_word:
        read_previous_word(text_encoder_2)
    pipe.register_modules(tokenizer=clip_tokenizer, text_encoder=text_encoder, tokenizer_2=t5_tokenizer,
                          text_encoder_2=text_encoder_2, transformer=world_transformer().eval())  # fmt: skip
    return pipe


def read_previous_word(t5) -> None:
    """Make the random T5 encoder's one attention layer look only at the word before each word.

    FLUX gives text tokens no position, so with near-uniform random attention "a red circle on blue"
    and "a blue circle on red" reach the transformer as almost the same bag of tokens: samples swapped
    subject and background. Reading the previous word makes the colour after "on" a different token
    from the colour after "a", and "circle" carry its colour."""
    attention = t5.encoder.block[0].layer[0].SelfAttention
    config = t5.config
    bucket = T5Attention._relative_position_bucket(
        torch.tensor(-1), bidirectional=True, num_buckets=config.relative_attention_num_buckets,
        max_distance=config.relative_attention_max_distance,
    )  # fmt: skip
    bias = torch.full_like(attention.relative_attention_bias.weight, -8.0)
    bias[int(bucket)] = 8.0
    attention.relative_attention_bias.weight.data = bias


def build_world_flux(weights: str | None = None, previous_word: bool = True):
    """The world pipeline in float32, its transformer loaded from `weights` (default: the shipped file).
    `previous_word=False` only rebuilds the shipped weights' history (scripts/build_world.py)."""
    pipe = untrained_world_flux(previous_word)
    transformer = pipe.transformer
    if weights is None:
        weights = str(resources.files("artaug.models").joinpath(WEIGHTS))
    state = {k: v.float() for k, v in load_file(weights).items()}
    transformer.load_state_dict(state)
    return pipe


def captioned_batch(rng: np.random.Generator, size: int) -> tuple[np.ndarray, list[str]]:
    """`size` random scenes rendered, with captions whose attribute words are dropped at random."""
    images, captions = [], []
    for _ in range(size):
        scene_id = world.scenes()[rng.integers(len(world.scenes()))]
        scene = world.random_scene(*scene_id, rng)
        words = [w for w in world.attribute_words(scene) if rng.random() < WORD_CHANCE]
        images.append(world.render(scene))
        captions.append(world.caption(scene, words))
    return np.stack(images), captions


def pretrain_world(steps: int, seed: int = 0, batch: int = 32, lr: float = 1e-3, max_tokens: int = 32,
                   start: str | None = None, characters: bool = False,
                   previous_word: bool = True):  # fmt: skip
    """Train the world transformer from its seeded initialisation (or the weights file `start`);
    returns (pipe, losses). `characters`: read captions with the tiny FLUX's character-level text
    encoders instead of the world's word-level ones (the first stage of the shipped weights);
    `previous_word=False`: with the T5 encoder's random attention (the second and third stages)."""
    pipe = untrained_world_flux(previous_word) if start is None else build_world_flux(start, previous_word)
    if characters:
        tiny = build_tiny_flux(0, vae="patch")
        pipe.register_modules(tokenizer=tiny.tokenizer, text_encoder=tiny.text_encoder,
                              tokenizer_2=tiny.tokenizer_2, text_encoder_2=tiny.text_encoder_2)  # fmt: skip
    if start is None:
        torch.manual_seed(seed)
        pipe.transformer = world_transformer()
    pipe.transformer.train()
    rng = np.random.default_rng(seed)
    generator = torch.Generator().manual_seed(seed)
    transformer = pipe.transformer
    optimizer = torch.optim.AdamW(transformer.parameters(), lr=lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, lr, total_steps=steps, pct_start=0.05)
    losses, started = [], time.perf_counter()
    for step in range(steps):
        images, captions = captioned_batch(rng, batch)
        latents = encode_images(pipe, images)
        with torch.no_grad():
            embeds, pooled, _ = pipe.encode_prompt(captions, None, max_sequence_length=max_tokens)
        guidance = float(rng.uniform(1.0, 4.0))
        loss = flow_matching_loss(transformer, latents, embeds, pooled, generator, guidance)
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(transformer.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        losses.append(loss.item())
        if (step + 1) % 100 == 0:
            log.info("world pretrain step %d/%d loss %.4f (%.0f s)", step + 1, steps,
                     np.mean(losses[-100:]), time.perf_counter() - started)  # fmt: skip
    transformer.eval().requires_grad_(False)
    return pipe, losses


def save_world_weights(transformer, path: str) -> None:
    """float16 safetensors: half the size, and sampling runs in float32 after loading."""
    save_file({k: v.detach().half().contiguous() for k, v in transformer.state_dict().items()}, path)
