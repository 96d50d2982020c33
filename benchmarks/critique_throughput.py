"""Critique throughput: the `vllm` backend (ray.data.llm) vs a plain transformers `generate` loop.

    python benchmarks/critique_throughput.py [--images 64] [--tokens 64] [--batch 8]

Both sides critique the same images with the same instruction and produce exactly `--tokens` tokens
per answer (EOS ignored, no schema constraint), so the work is equal. Each side's output is timed as
it arrives: start-up is the time until the first `--warmup` critiques are out (engine or model load
included, Ray's own start excluded), steady state the critiques/s after that; ratios from one run.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np  # noqa: E402
import pyarrow as pa  # noqa: E402
import ray  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

from artaug.cluster import init_ray  # noqa: E402
from artaug.config import RayConfig, load_config  # noqa: E402
from artaug.critic.answers import REQUEST  # noqa: E402
from artaug.critic.backends import critic_model, critique_task  # noqa: E402
from artaug.critic.instruction import instruction  # noqa: E402
from artaug.critic.vllm_backend import vllm_answers  # noqa: E402
from artaug.images import data_url  # noqa: E402


def images(n: int, side: int = 64) -> list[Image.Image]:
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 255, (side, side, 3), dtype=np.uint8)) for _ in range(n)]


def rates(stamps: list[tuple[float, int]], warmup: int) -> dict:
    done, cut, after = 0, None, 0
    for t, n in stamps:
        done += n
        if cut is None and done >= warmup:
            cut, after = t, done
    return {
        "startup_s": round(cut, 3),
        "steady_per_s": round((done - after) / (stamps[-1][0] - cut), 3),
        "total_s": round(stamps[-1][0], 3),
    }


def vllm_side(cfg, model: str, pictures, tokens: int) -> list[tuple[float, int]]:
    rows = [
        {"prompt_id": f"p{i}", "prompt": "a harbour", "seed": i, "round": 1, "image_url": data_url(im),
         "box_max": 1000, "box_scale_w": 1000, "box_scale_h": 1000, "error": None}
        for i, im in enumerate(pictures)
    ]  # fmt: skip
    ds = ray.data.from_arrow(pa.Table.from_pylist(rows, schema=REQUEST)).repartition(len(rows) // 8)
    fixed = {"max_tokens": tokens, "min_tokens": tokens, "ignore_eos": True, "temperature": 0.0}
    start = time.perf_counter()
    stamps = []
    task = critique_task(cfg.critique.box_format)
    for batch in vllm_answers(ds, cfg.critique, model, task.request, sampling_override=fixed).iter_batches(
        batch_size=None, batch_format="pyarrow"
    ):
        assert all(e is None for e in batch.column("error").to_pylist())
        stamps.append((time.perf_counter() - start, batch.num_rows))
    return stamps


def transformers_side(model: str, pictures, tokens: int, batch: int) -> list[tuple[float, int]]:
    from transformers import AutoProcessor, Qwen2VLForConditionalGeneration

    start = time.perf_counter()
    processor = AutoProcessor.from_pretrained(model)
    processor.tokenizer.padding_side = "left"
    vlm = Qwen2VLForConditionalGeneration.from_pretrained(model, dtype=torch.float32).eval()
    text = processor.apply_chat_template(
        [
            {
                "role": "user",
                "content": [{"type": "image"}, {"type": "text", "text": instruction("a harbour")}],
            }
        ],
        add_generation_prompt=True,
    )
    stamps = []
    for i in range(0, len(pictures), batch):
        chunk = pictures[i : i + batch]
        inputs = processor(text=[text] * len(chunk), images=chunk, return_tensors="pt", padding=True)
        with torch.inference_mode():
            out = vlm.generate(**inputs, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False)
        assert out.shape[1] - inputs["input_ids"].shape[1] == tokens
        processor.batch_decode(out[:, inputs["input_ids"].shape[1] :])
        stamps.append((time.perf_counter() - start, len(chunk)))
    return stamps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--batch", type=int, default=8, help="transformers batch; vLLM batch_size too")
    parser.add_argument("--warmup", type=int, default=8)
    parser.add_argument("--out", default="")
    args = parser.parse_args()
    cfg = load_config("tiny", overrides=[f"critique.batch_size={args.batch}"])
    model = critic_model(cfg.critique)
    pictures = images(args.images)
    init_ray(RayConfig(num_cpus=4))
    torch.set_num_threads(1)
    fast = rates(vllm_side(cfg, model, pictures, args.tokens), args.warmup)
    plain = rates(transformers_side(model, pictures, args.tokens, args.batch), args.warmup)
    results = {
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}",
        "work": f"{args.images} images 64x64, {args.tokens} tokens each, batch {args.batch}",
        "vllm_backend": fast,
        "transformers_loop": plain,
        "steady_ratio": round(fast["steady_per_s"] / plain["steady_per_s"], 3),
        "startup_ratio": round(fast["startup_s"] / plain["startup_s"], 3),
    }
    print(json.dumps(results, indent=2))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
