"""Tiny, randomly initialised Qwen VLMs saved like hub checkpoints, so vLLM serves them on CPU.

`tiny` (critique.model): Qwen2-VL's structure (vision tower with 2x2 patch merging, M-RoPE text
decoder, the image placeholder tokens and a Qwen-style chat template) at a size that starts in
seconds. `tiny-qwen2.5-vl`: Qwen2.5-VL with its processor at the released values (patch 14, merge 2,
min/max pixels, so a 1024-pixel image becomes 1,369 image tokens as on a cluster) and its vision
tower at Qwen2.5-VL-7B's width (1280, 16 heads, MLP 3420; two blocks: one windowed, one full
attention), under the tiny text decoder: the shapes of the real critic's image path at a cost a CPU
can pay. Their tokenizer is a byte-level BPE trained in code on the words a critique uses, so JSON
answers take few tokens. Untrained, they say nothing meaningful: they exercise the real serving,
image-processing and structured-output paths.

    artaug models build-tiny-vlm ./tiny-vlm
"""

from __future__ import annotations

import json
import os

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    GenerationConfig,
    PreTrainedTokenizerFast,
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2_5_VLProcessor,
    Qwen2VLConfig,
    Qwen2VLForConditionalGeneration,
    Qwen2VLProcessor,
)
from transformers.models.qwen2_vl.image_processing_qwen2_vl import Qwen2VLImageProcessor
from transformers.models.qwen2_vl.video_processing_qwen2_vl import Qwen2VLVideoProcessor

from artaug.config import BUILT_IN_VLMS
from artaug.critic.instruction import instruction
from artaug.critic.schema import ADJUSTMENT_ASPECTS, DIRECTIONS
from artaug.models.cache import build_once

SPECIALS = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|image_pad|>",
    "<|video_pad|>",
]

# Qwen-style chat template: text parts verbatim, each image as vision_start + image_pad + vision_end.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] in ('image', 'image_url') %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

MIN_PIXELS = 28 * 28
MAX_PIXELS = 56 * 56  # keeps an image to a handful of tokens
# Qwen2.5-VL-7B-Instruct's released preprocessor and vision tower (config.json, preprocessor_config.json)
QWEN25_MIN_PIXELS, QWEN25_MAX_PIXELS = 3136, 12845056
QWEN25_VISION = dict(
    hidden_size=1280, intermediate_size=3420, num_heads=16, patch_size=14,
    spatial_merge_size=2, temporal_patch_size=2, window_size=112, hidden_act="silu",
)  # fmt: skip
FOLDERS = dict(zip(BUILT_IN_VLMS, ("tiny-qwen2-vl-v1", "tiny-qwen2.5-vl-v1"), strict=True))  # cache names


def _corpus() -> list[str]:
    words = list(ADJUSTMENT_ASPECTS) + list(DIRECTIONS)
    sample = {"assessment": "", "rating": 5, "adjustments": [], "regions": [], "rewritten_prompt": ""}
    return [instruction("a photo of a cat"), json.dumps(sample), " ".join(words), '0123456789[]{},:" '] * 4


def build_tokenizer():
    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=600,
        special_tokens=SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    core.train_from_iterator(_corpus(), trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=core,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        model_max_length=4096,
        chat_template=CHAT_TEMPLATE,
    )


def _text_config(ids: dict, vocab: int) -> dict:
    return dict(
        vocab_size=vocab,
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,  # head_dim 32: vLLM's CPU attention needs >= 32
        num_key_value_heads=2,
        max_position_embeddings=4096,
        rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": [4, 6, 6]},
        bos_token_id=ids["<|endoftext|>"],
        eos_token_id=ids["<|im_end|>"],
        pad_token_id=ids["<|endoftext|>"],
    )


def build_tiny_vlm(
    directory: str, seed: int = 0, family: str = "tiny", text: dict | None = None, vision: dict | None = None,
    weights: bool = True,
) -> str:  # fmt: skip
    """Build, save (safetensors, tokenizer, processor, chat template) and return the folder; `family`:
    "tiny" (Qwen2-VL) or "tiny-qwen2.5-vl" (Qwen2.5-VL's processor and vision width). `text` and
    `vision` override config values; without `weights` only the configuration is saved, for vLLM's
    `--load-format dummy` (benchmarks/critic_real_shapes.py: 7B widths, no 7B of memory)."""
    torch.manual_seed(seed)
    tokenizer = build_tokenizer()
    ids = {token: tokenizer.convert_tokens_to_ids(token) for token in SPECIALS}
    tokens = dict(
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
    )
    text = _text_config(ids, len(tokenizer)) | (text or {})
    if family == "tiny-qwen2.5-vl":
        tower = dict(QWEN25_VISION, depth=2, fullatt_block_indexes=[1], out_hidden_size=text["hidden_size"])
        config = Qwen2_5_VLConfig(text_config=text, vision_config=tower | (vision or {}), **tokens)
        model_class, processor_class = Qwen2_5_VLForConditionalGeneration, Qwen2_5_VLProcessor
        pixels = dict(min_pixels=QWEN25_MIN_PIXELS, max_pixels=QWEN25_MAX_PIXELS)
    else:
        tower = dict(depth=2, embed_dim=64, hidden_size=128, num_heads=2, mlp_ratio=2, patch_size=14,
                     spatial_merge_size=2, temporal_patch_size=2)  # fmt: skip
        config = Qwen2VLConfig(text_config=text, vision_config=tower | (vision or {}), **tokens)
        model_class, processor_class = Qwen2VLForConditionalGeneration, Qwen2VLProcessor
        pixels = dict(min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS)
    config.eos_token_id = ids["<|im_end|>"]
    config.pad_token_id = ids["<|endoftext|>"]
    os.makedirs(directory, exist_ok=True)
    if weights:
        model = model_class(config).eval()
        model.generation_config.eos_token_id = ids["<|im_end|>"]
        model.generation_config.pad_token_id = ids["<|endoftext|>"]
        model.save_pretrained(directory, safe_serialization=True)
    else:
        config.architectures = [model_class.__name__]  # how vLLM picks the model class
        config.save_pretrained(directory)
        GenerationConfig(eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|endoftext|>"]).save_pretrained(
            directory
        )
    processor = processor_class(
        image_processor=Qwen2VLImageProcessor(**pixels),
        video_processor=Qwen2VLVideoProcessor(**pixels),
        tokenizer=tokenizer,
        chat_template=CHAT_TEMPLATE,
    )
    processor.save_pretrained(directory)
    return directory


def ensure_tiny_vlm(cache_dir: str, seed: int = 0, family: str = "tiny") -> str:
    """The tiny VLM's folder under cache_dir (`family`: one of BUILT_IN_VLMS), built on first use."""
    return build_once(
        cache_dir, f"{FOLDERS[family]}-seed{seed}", lambda folder: build_tiny_vlm(folder, seed, family)
    )


def processor_inputs(processor, messages: list[dict], image):
    """What a VLM's own processor makes of a critique request (its data URL given as `image`): the
    inputs whose length the prompt vLLM counts must equal (tests and benchmarks of the real shapes)."""
    chat = [  # the chat template takes an image placeholder where the request has a data URL
        {**m, "content": [{"type": "image"} if p["type"] == "image_url" else p for p in m["content"]]}
        if isinstance(m["content"], list) else m
        for m in messages
    ]  # fmt: skip
    text = processor.apply_chat_template(chat, add_generation_prompt=True, tokenize=False)
    return processor(text=[text], images=[image], return_tensors="pt")
