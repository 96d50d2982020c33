"""An MLLM pairwise judge: which of two images of the same prompt is more beautiful?

The two images are composed side by side into one picture (left | right) with a gap between, so any
VLM that takes one image judges, including the tiny Qwen2-VL, and the engines keep the critic's
`limit_mm_per_prompt` of one image. Every pair is judged twice, with the LoRA image once on the
right and once on the left; `artaug.stats.symmetrise` combines the two so position bias cancels.
Answers are constrained to a small bounded JSON schema and validated; an answer that does not parse
is a missing judgement (reported), never a tie. This module is the judge's one home: its settings
(derived from the critic's), the requests, asking through the critic backends, parsing, and the win
rates over prompts.
"""

from __future__ import annotations

import dataclasses
import json
import logging

import jsonschema
import ray
from PIL import Image

from artaug import stats
from artaug.config import CritiqueConfig, RunConfig
from artaug.critic.answers import check_failures
from artaug.critic.backends import Task, ask, critic_model
from artaug.critic.openai_backend import Endpoint
from artaug.images import BadImageError, data_url, decode_image

JUDGE_VERSION = "judge-v1"
ORDERS = ("lora_right", "lora_left")  # where the LoRA image is shown
GAP = 8  # pixels of white between the two images

log = logging.getLogger(__name__)

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
        try:
            base, lora = decode_image(pair["base"]), decode_image(pair["lora"])
        except BadImageError as err:  # not asked: the metrics count the pair missing
            log.warning("judge: %s not asked: %s", pair["prompt_id"], err)
            continue
        for order in ORDERS:
            left, right = (base, lora) if order == "lora_right" else (lora, base)
            rows.append({
                "prompt_id": f"{pair['prompt_id']}#{order}", "prompt": pair["prompt"], "seed": pair["seed"],
                "round": 0, "image_url": data_url(compose(left, right, side)),
                "box_max": 1000, "box_scale_w": 1000, "box_scale_h": 1000, "error": None,
            })  # fmt: skip
    return rows


def request(row: dict) -> tuple[list[dict], dict]:
    """(chat messages, JSON schema) of one judge request."""
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
    except RecursionError:
        return None, "unparseable: nested too deeply"
    except jsonschema.ValidationError as err:
        return None, f"unparseable: {err.message}"
    return data["winner"], data["reason"]


JUDGE_TASK = Task(JUDGE_VERSION, request)


def judge_config(cfg: RunConfig) -> CritiqueConfig:
    """The critic's settings with the judge's backend, model, endpoint and token budget."""
    return dataclasses.replace(
        cfg.critique,
        backend=cfg.evaluate.judge_backend,
        model=cfg.evaluate.judge_model,
        base_url=cfg.evaluate.judge_base_url or cfg.critique.base_url,
        max_tokens=cfg.evaluate.judge_max_tokens,
        temperature=0.0,
    )


def judge_model(cfg: RunConfig) -> str:
    """The model the judge asks: for vllm a loadable folder or hub id (the tiny judge has its own seed)."""
    if cfg.evaluate.judge_backend == "vllm":
        return critic_model(judge_config(cfg), tiny_seed=cfg.evaluate.judge_tiny_seed)
    return cfg.evaluate.judge_model


def judge_pairs(
    cfg: RunConfig, pairs: list[dict], model: str, endpoint: Endpoint | None = None
) -> list[dict]:
    """Two judgements per pair row with both images (`base`, `lora` PNGs): {prompt_id, order, winner,
    reason, raw, error}. Rows without both images are not asked (the metrics count them missing).
    Raises when the judge failed on more than critique.max_failed_fraction of its requests."""
    usable = [row for row in pairs if row["base"] and row["lora"]]
    rows = judge_rows(usable, cfg.evaluate.judge_image_side)
    if not rows:
        return []
    ds = ray.data.from_items(rows, override_num_blocks=min(len(rows), 8))
    answers = ask(ds, judge_config(cfg), JUDGE_TASK, model, endpoint).take_all()
    check_failures("judge", [answer.get("error") for answer in answers], cfg.critique.max_failed_fraction)
    out = []
    for answer in answers:
        prompt_id, order = answer["prompt_id"].rsplit("#", 1)
        winner, reason = parse_judgement(answer["raw"]) if not answer.get("error") else (None, "no answer")
        out.append({"prompt_id": prompt_id, "order": order, "winner": winner, "reason": reason,
                    "raw": answer["raw"], "error": answer.get("error")})  # fmt: skip
    return out


def judge_metrics(prompt_ids: list[str], judgements: list[dict], opts: dict) -> dict:
    """Win / tie / loss of the LoRA image over prompts, both orders combined (position bias cancels)."""
    by_key = {(j["prompt_id"], j["order"]): j["winner"] for j in judgements}
    winners = {order: [by_key.get((pid, order)) for pid in prompt_ids] for order in ORDERS}
    votes = {order: [stats.vote(w, "right" if order == "lora_right" else "left") for w in winners[order]]
             for order in ORDERS}  # fmt: skip
    outcomes = stats.symmetrise(votes["lora_right"], votes["lora_left"])
    per_order = {}
    for order in ORDERS:
        single = [
            None if v is None else ("win" if v > 0 else "loss" if v < 0 else "tie") for v in votes[order]
        ]
        per_order[order] = stats.win_rates(single, **opts)
    all_winners = winners["lora_right"] + winners["lora_left"]
    return {
        "kind": "MLLM judge (not human preference)",
        **stats.win_rates(outcomes, **opts),
        "judgements": len(judgements),
        "unparseable_or_missing_judgements": sum(w is None for w in all_winners),
        "left_share": stats.left_share(all_winners),
        "per_order": per_order,
    }
