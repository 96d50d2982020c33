"""An MLLM pairwise judge: which of two images of the same prompt is more beautiful?

The two images are composed side by side into one picture (left | right) with a gap between, so any
VLM that takes one image judges, including the tiny Qwen2-VL, and the engines keep the critic's
`limit_mm_per_prompt` of one image. Every pair is judged twice, with the LoRA image once on the
right and once on the left; `artaug.stats.symmetrise` combines the two so position bias cancels.
Answers are constrained to a small bounded JSON schema and validated; an answer that does not parse
is a missing judgement (reported), never a tie.
"""

from __future__ import annotations

import json

import jsonschema
from PIL import Image

from artaug.critique.openai_backend import OpenAICritic, request_body
from artaug.images import data_url, decode_image

JUDGE_VERSION = "judge-v1"
SIDES = ("left", "right")
ORDERS = ("lora_right", "lora_left")  # where the LoRA image is shown
GAP = 8  # pixels of white between the two images

JUDGE_SCHEMA = {
    "type": "object",
    "properties": {
        "winner": {"type": "string", "enum": ["left", "right", "tie"]},
        "reason": {"type": "string", "maxLength": 100},
    },
    "required": ["winner", "reason"],
    "additionalProperties": False,
}

_INSTRUCTION = """You see two images side by side, both generated from this prompt:
"{prompt}"
Which one is more beautiful (lighting, colour, composition, detail) while still showing the prompt? \
Judge only the images, not their position. Answer with one JSON object and nothing else:
{{"winner": "left" | "right" | "tie", "reason": "<at most 100 characters>"}}"""


def instruction(prompt: str) -> str:
    return _INSTRUCTION.format(prompt=prompt.replace('"', "'"))


def compose(left: Image.Image, right: Image.Image, side: int) -> Image.Image:
    """Both images scaled to fit side x side, centred in equal cells, left | gap | right."""
    canvas = Image.new("RGB", (2 * side + GAP, side), "white")
    for index, image in enumerate((left, right)):
        tile = image.convert("RGB").copy()
        tile.thumbnail((side, side), Image.Resampling.LANCZOS)
        x = index * (side + GAP) + (side - tile.width) // 2
        canvas.paste(tile, (x, (side - tile.height) // 2))
    return canvas


def judge_rows(pairs: list[dict], side: int) -> list[dict]:
    """Two judge requests per pair row (with `base` and `lora` PNGs), one per order.

    The order travels in the row id (`<prompt_id>#<order>`) because the critic backends return only
    the ids they were given.
    """
    rows = []
    for pair in pairs:
        base, lora = decode_image(pair["base"]), decode_image(pair["lora"])
        for order in ORDERS:
            left, right = (base, lora) if order == "lora_right" else (lora, base)
            rows.append({
                "prompt_id": f"{pair['prompt_id']}#{order}", "prompt": pair["prompt"], "seed": pair["seed"],
                "round": 0, "image_url": data_url(compose(left, right, side)),
                "box_max": 1000, "box_scale_w": 1000, "box_scale_h": 1000, "error": None,
            })  # fmt: skip
    return rows


def request(row: dict) -> tuple[list[dict], dict]:
    """(chat messages, JSON schema) of one judge request, for the vLLM backend's `request` hook."""
    messages = [
        {
            "role": "user",
            "content": [
                {"type": "image_url", "image_url": {"url": row["image_url"]}},
                {"type": "text", "text": instruction(row["prompt"])},
            ],
        }
    ]
    return messages, JUDGE_SCHEMA


def parse_judgement(raw: str | None) -> tuple[str | None, str]:
    """(winner or None, reason or why it is missing)."""
    if raw is None:
        return None, "no answer"
    try:
        data = json.loads(raw, strict=False)
        jsonschema.validate(data, JUDGE_SCHEMA)
    except json.JSONDecodeError as err:
        return None, f"unparseable: not JSON ({err.msg})"
    except jsonschema.ValidationError as err:
        return None, f"unparseable: {err.message}"
    return data["winner"], data["reason"]


def ask_judge(ds, cfg, model: str):
    """Judge request rows -> answer rows (critic ANSWER schema) through the configured backend."""
    if cfg.backend == "openai":
        import ray

        return ds.map_batches(
            OpenAIJudge,
            fn_constructor_kwargs={"cfg": cfg},
            batch_format="pyarrow",
            batch_size=cfg.batch_size,
            compute=ray.data.ActorPoolStrategy(size=1),
            num_cpus=0.5,
        )
    from artaug.critique.vllm_backend import vllm_critique

    return vllm_critique(ds, cfg, model, request=request)


class OpenAIJudge(OpenAICritic):
    """The critic's OpenAI-compatible client (retries, timeouts, key handling) sending judge requests."""

    def _body(self, row: dict) -> dict:
        messages, schema = request(row)
        return request_body(self.cfg, self.model, messages, schema, JUDGE_VERSION)
