"""Generate-stage throughput against a plain in-process diffusers loop over the same tiny model.

    python benchmarks/generate_throughput.py            # or: make bench
    python benchmarks/generate_throughput.py --images 96 --size 128 --steps 8

Equal work on both sides: the same prompts, seeds, size, steps and batch size, each image encoded
as PNG. Equal threads: k actors x 1 torch thread against the plain loop with k torch threads.
Each side's output is timed as it arrives: start-up is the time until the first `--warmup` images
are out (Ray's own start excluded; actor processes, imports, pipeline construction, first batches),
steady state the images/s after that. Both are reported as ratios measured in this one run.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import time

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import ray  # noqa: E402
import torch  # noqa: E402

from artaug.cluster import init_ray  # noqa: E402
from artaug.config import RayConfig, load_config  # noqa: E402
from artaug.models.synthesis import load_pipeline  # noqa: E402
from artaug.stages.generator import FluxGenerator  # noqa: E402


def prompts(n: int) -> list[dict]:
    return [{"prompt_id": f"p{i:04d}", "prompt": f"a lighthouse at dusk, {i}", "index": i} for i in range(n)]


def plain_loop(cfg, rows: list[dict], threads: int) -> list[tuple[float, int]]:
    """The baseline: a diffusers pipeline called batch by batch in this process."""
    torch.set_num_threads(threads)
    g = cfg.generate
    start = time.perf_counter()
    pipe = load_pipeline(cfg.model)
    stamps = []
    for i in range(0, len(rows), g.batch_size):
        chunk = rows[i : i + g.batch_size]
        images = pipe(
            prompt=[r["prompt"] for r in chunk],
            width=g.width,
            height=g.height,
            num_inference_steps=g.steps,
            guidance_scale=g.guidance,
            generator=[torch.Generator().manual_seed(g.seed + r["index"]) for r in chunk],
            max_sequence_length=cfg.model.max_sequence_length,
        ).images
        for image in images:
            image.save(io.BytesIO(), format="PNG")
        stamps.append((time.perf_counter() - start, len(chunk)))
    return stamps


def ray_stage(cfg, rows: list[dict], actors: int) -> list[tuple[float, int]]:
    """The generate stage's actor pool (Ray already up), consumed as a stream."""
    g = cfg.generate
    start = time.perf_counter()
    ds = ray.data.from_items(rows, override_num_blocks=len(rows) // g.batch_size).map_batches(
        FluxGenerator,
        fn_constructor_kwargs={"cfg": cfg},
        batch_size=g.batch_size,
        batch_format="pyarrow",
        compute=ray.data.ActorPoolStrategy(size=actors),
        num_cpus=1,
    )
    stamps = []
    for batch in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
        assert all(e is None for e in batch.column("error").to_pylist())
        stamps.append((time.perf_counter() - start, batch.num_rows))
    return stamps


def rates(stamps: list[tuple[float, int]], warmup: int) -> dict:
    """Start-up: time until `warmup` images are out. Steady state: images/s after that."""
    done, cut = 0, None
    for t, n in stamps:
        done += n
        if cut is None and done >= warmup:
            cut, after = t, done
    total_time, total = stamps[-1][0], done
    return {
        "startup_s": round(cut, 3),
        "steady_images_per_s": round((total - after) / (total_time - cut), 3),
        "total_s": round(total_time, 3),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=200)
    parser.add_argument("--warmup", type=int, default=16, help="images counted as start-up")
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--out", default="", help="also write the results as JSON here")
    args = parser.parse_args()
    cfg = load_config(
        "tiny",
        overrides=[
            f"generate.width={args.size}",
            f"generate.height={args.size}",
            f"generate.steps={args.steps}",
            f"generate.batch_size={args.batch_size}",
        ],
    )
    rows = prompts(args.images)
    results = {
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, {platform.python_version()}",
        "work": f"{args.images} images {args.size}x{args.size}, {args.steps} steps, batch {args.batch_size}",
    }
    init_ray(RayConfig(num_cpus=4))
    plain_loop(cfg, rows[:4], threads=1)  # warm imports, so plain start-up is construction only
    for actors in (1, 2):
        ray_side = rates(ray_stage(cfg, rows, actors), args.warmup)
        plain = rates(plain_loop(cfg, rows, threads=actors), args.warmup)
        results[f"{actors}_actor"] = {
            "ray": ray_side,
            "plain": plain,
            "steady_ratio": round(ray_side["steady_images_per_s"] / plain["steady_images_per_s"], 3),
            "startup_ratio": round(ray_side["startup_s"] / plain["startup_s"], 3),
        }
    one, two = results["1_actor"]["ray"], results["2_actor"]["ray"]
    results["2_vs_1_actor_steady"] = round(two["steady_images_per_s"] / one["steady_images_per_s"], 3)
    print(json.dumps(results, indent=2))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
