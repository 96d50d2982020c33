"""The interaction at request time: what an enhanced request costs against a plain one, and what it buys.

    python benchmarks/serve_enhance.py [--prompts 32] [--out benchmarks/results/serve-enhance.json]

One run, in the miniature world (the default preset: its small FLUX and the critic that reads the
pixels), with serve.enhance on: for each held-out prompt and seed of the world's evaluation set,
a plain request (`POST /v1/images/generations`) and an enhanced one (`"enhance": true`: generate,
critique, regenerate), alternating which goes first, one at a time over HTTP. Reported:
  - latency, median and p95 of each, and the ratio of medians (enhanced / plain): the cost;
  - the world's evaluation scorers (world_quality, world_alignment) on each enhanced answer's two
    images, the paired difference with a bootstrap interval: what the request buys.
Ray and Serve start-up are reported apart; both sides are warmed first.
"""

from __future__ import annotations

import argparse
import base64
import datetime
import io
import json
import os
import socket
import statistics
import time

os.environ.setdefault("OMP_NUM_THREADS", "1")

import requests  # noqa: E402
from machine_facts import machine  # noqa: E402  (benchmarks/, beside this script)
from PIL import Image  # noqa: E402

RESULT = os.path.join(os.path.dirname(__file__), "results", "serve-enhance.json")
EVAL_PROMPTS = os.path.join(os.path.dirname(__file__), "..", "artaug", "presets", "world_eval_prompts.jsonl")


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def decode(b64: str) -> Image.Image:
    return Image.open(io.BytesIO(base64.b64decode(b64))).convert("RGB")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=32, help="held-out (prompt, seed) rows to use")
    parser.add_argument("--out", default=RESULT, help="write the results as JSON here ('' to skip)")
    args = parser.parse_args()

    from ray import serve

    from artaug.cluster import init_ray
    from artaug.config import ScorersConfig
    from artaug.scorers.base import build_scorer
    from artaug.serve.app import build_app
    from artaug.serve.launch import resolve_config
    from artaug.stats import paired

    with open(EVAL_PROMPTS) as f:
        rows = [json.loads(line) for line in f if line.strip()][: args.prompts]
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    cfg = resolve_config(preset="world", overrides=["serve.enhance=true", f"serve.port={port}"])
    url = f"http://127.0.0.1:{port}/v1/images/generations"
    result = {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "machine": machine(("torch", "diffusers", "ray")),
        "work": f"1 image {cfg.generate.width}x{cfg.generate.height}, {cfg.generate.steps} steps, the world's"
        f" FLUX; critic {cfg.critique.backend}; enhance {cfg.enhance.mode}, global prompt"
        f" {cfg.enhance.global_prompt}",
        "load_avg_at_start": [round(x, 2) for x in os.getloadavg()],
    }
    start = time.perf_counter()
    init_ray(cfg.ray)
    ray_s = time.perf_counter() - start
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(build_app(cfg), name=cfg.serve.app_name, route_prefix="/")
    result["startup_s"] = {"ray": round(ray_s, 1), "serve": round(time.perf_counter() - start - ray_s, 1)}

    def ask(row: dict, enhance: bool) -> tuple[float, dict]:
        body = {"prompt": row["prompt"], "seed": row["seed"], "enhance": enhance}
        began = time.perf_counter()
        answer = requests.post(url, json=body, timeout=300)
        answer.raise_for_status()
        return time.perf_counter() - began, answer.json()["data"][0]

    try:
        for warm in rows[:2]:
            ask(warm, False), ask(warm, True)
        seconds = {"plain": [], "enhanced": []}
        items = []
        for i, row in enumerate(rows):
            order = (False, True) if i % 2 == 0 else (True, False)
            for enhance in order:
                spent, item = ask(row, enhance)
                seconds["enhanced" if enhance else "plain"].append(spent)
                if enhance:
                    items.append(item)
        critic = serve.get_deployment_handle("CriticModel", cfg.serve.app_name).stats.remote().result()
    finally:
        serve.shutdown()

    latency = {
        side: {
            "median_ms": round(statistics.median(s) * 1000, 1),
            "p95_ms": round(percentile(s, 0.95) * 1000, 1),
        }
        for side, s in seconds.items()
    }
    ratio = statistics.median(seconds["enhanced"]) / statistics.median(seconds["plain"])
    prompts = [row["prompt"] for row in rows]
    before = [decode(item["original_b64_json"]) for item in items]
    after = [decode(item["b64_json"]) for item in items]
    scorers = ScorersConfig()
    quality = {}
    for name in ("world_quality", "world_alignment"):
        scorer = build_scorer(name, scorers)
        a, b = scorer.score(before, prompts)[name], scorer.score(after, prompts)[name]
        quality[name] = paired(list(a), list(b), clusters=prompts)
    result.update(
        requests_per_side=len(rows),
        latency=latency,
        enhanced_over_plain=round(ratio, 2),
        unchanged=sum(1 for item in items if item["unchanged"]),
        with_regions=sum(1 for item in items if item["regions"]),
        critic_seconds_per_critique=round(critic["busy_s"] / max(1, critic["critiques"]), 4),
        scores=quality,
    )
    if args.out:
        os.makedirs(os.path.dirname(args.out), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(result, f, indent=2)
    print(f"{len(rows)} requests per side; plain {latency['plain']}, enhanced {latency['enhanced']}")
    print(f"enhanced / plain (medians): {ratio:.2f}")
    for name, figures in quality.items():
        d, higher = figures["difference"], figures["lora_higher_share"]
        print(f"{name}: before {figures['base']['mean']:.4f}, after {figures['lora']['mean']:.4f}, "
              f"difference {d['mean']:+.4f} {d['ci']}, higher after in {higher:.0%}")  # fmt: skip


if __name__ == "__main__":
    main()
