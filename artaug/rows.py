"""Columns shared by stages. Ids (prompt_id, seed, round) never change from stage to stage."""

from __future__ import annotations

import pyarrow as pa

# Every image row starts with its ids and the settings it was sampled with.
IMAGE_ROW = [
    ("prompt_id", pa.string()),
    ("prompt", pa.string()),
    ("seed", pa.int64()),
    ("round", pa.int32()),
    ("width", pa.int32()),
    ("height", pa.int32()),
    ("steps", pa.int32()),
    ("guidance", pa.float32()),
]

GENERATE = pa.schema(
    [
        *IMAGE_ROW,
        ("image", pa.binary()),  # PNG bytes; null on error rows
        ("error", pa.string()),  # null when the row succeeded
        ("warning", pa.string()),  # e.g. the prompt was truncated; null when none
        ("seconds", pa.float64()),  # this row's share of its batch's wall time
    ]
)

# The enhance stage writes one pair row per generated image; the filter stage keeps these columns
# and adds its scores, `accepted` and `reject_reasons`. Training uses both images with `prompt`
# (the original prompt), never `enhance_prompt`.
PAIR = pa.schema(
    [
        *IMAGE_ROW,  # `prompt` is the original prompt: the caption of both images in training
        ("before", pa.binary()),  # PNG of the generated image
        ("after", pa.binary()),  # PNG of the enhanced image; null on error rows
        ("enhance_prompt", pa.string()),  # the global prompt used for enhancement
        ("mode", pa.string()),  # regional | img2img | photometric
        ("regions", pa.string()),  # JSON list of the regions used: [{"box": [x0,y0,x1,y1], "prompt": ...}]
        ("unchanged", pa.bool_()),  # no usable suggestion: after == before
        ("error", pa.string()),
        ("seconds", pa.float64()),
    ]
)

# The critique stage writes one row per image. `critique` is the parsed answer as JSON (boxes
# normalised to [0, 1]); `raw` is what the model said, kept for every row that got an answer.
CRITIQUE = pa.schema(
    [
        ("prompt_id", pa.string()),
        ("prompt", pa.string()),
        ("seed", pa.int64()),
        ("round", pa.int32()),
        ("status", pa.string()),  # ok | invalid (answer not a valid critique) | failed (no answer)
        ("critique", pa.string()),  # JSON; null unless status is ok
        ("rating", pa.int32()),  # the critique's aesthetic rating; null unless ok
        ("suggestions", pa.int32()),  # adjustments + regions + rewritten prompt (0 means nothing to do)
        ("raw", pa.string()),
        ("backend", pa.string()),
        ("model", pa.string()),
        ("error", pa.string()),
        ("seconds", pa.float64()),
    ]
)

# The latent cache written by the cache_latents stage and read by training workers: one row per pair,
# tensors as raw bytes of `dtype` (bf16 survives exactly) with their shapes. Latents are the VAE's
# scaled and shifted posterior means; text embeddings are those of the original prompt. A pair that
# cannot be trained on keeps its ids and gets `skipped` (the reason) and null tensors.
LATENT = pa.schema(
    [
        ("prompt_id", pa.string()),
        ("seed", pa.int64()),
        ("round", pa.int32()),
        ("prompt", pa.string()),
        ("width", pa.int32()),
        ("height", pa.int32()),
        ("skipped", pa.string()),  # null when the pair is usable
        ("dtype", pa.string()),  # torch dtype name of every tensor below, e.g. "float32"
        ("latent_shape", pa.list_(pa.int32())),  # [channels, height / 8, width / 8]
        ("before_latent", pa.binary()),
        ("after_latent", pa.binary()),
        ("text_shape", pa.list_(pa.int32())),  # [T5 tokens, T5 width]
        ("prompt_embeds", pa.binary()),  # T5 hidden states
        ("pooled_embeds", pa.binary()),  # CLIP pooled output
    ]
)
