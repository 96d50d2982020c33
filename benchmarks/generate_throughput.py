"""The generate stage on warm hosts against the same generation code called in a plain loop.

    python benchmarks/generate_throughput.py            # or: make bench
    python benchmarks/generate_throughput.py --images 96 --size 128 --steps 8

Equal work on both sides: the same prompts, seeds, size, steps and batch size, the same code
(`stages.generator.FluxGenerator`: our sampling loop, each image encoded as PNG). The stage side is
the generate stage's dataset (`generated_images`: Ray Data tasks calling `ModelHost` actors); the
plain side calls FluxGenerator batch by batch in this process. Equal threads: k hosts x 1 torch
thread against the plain loop with k torch threads. Each side's output is timed as it arrives:
start-up is the time until the first `--warmup` images are out (Ray's own start excluded), steady
state the images/s after that. The stage runs twice on the same hosts: the first call pays the hosts'
start (processes, imports, the model), the second is what round k > 1 pays. Every figure is a ratio
measured in this one run.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pyarrow as pa  # noqa: E402
import torch  # noqa: E402

from artaug.cluster import init_ray  # noqa: E402
from artaug.config import RayConfig, load_config, override  # noqa: E402
from artaug.prompts import PromptSet  # noqa: E402
from artaug.stages.generator import FluxGenerator, generated_images  # noqa: E402
from artaug.stages.hosts import Hosts  # noqa: E402


def prompts(n: int) -> list[dict]:
    return [{"prompt_id": f"p{i:04d}", "prompt": f"a lighthouse at dusk, {i}", "index": i} for i in range(n)]


def plain_loop(cfg, rows: list[dict], threads: int) -> list[tuple[float, int]]:
    """The baseline: the generation code called batch by batch in this process."""
    torch.set_num_threads(threads)
    size = cfg.generate.batch_size
    start = time.perf_counter()
    generator = FluxGenerator(cfg)
    stamps = []
    for i in range(0, len(rows), size):
        out = generator(pa.Table.from_pylist(rows[i : i + size]))
        assert all(e is None for e in out.column("error").to_pylist())
        stamps.append((time.perf_counter() - start, out.num_rows))
    return stamps


def stage(cfg, rows: list[dict], hosts: Hosts) -> list[tuple[float, int]]:
    """The generate stage's dataset on `hosts` (Ray already up), consumed as a stream."""
    start = time.perf_counter()
    ds = generated_images(cfg, PromptSet(rows=rows), hosts)
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
    parser.add_argument("--blocks", type=int, default=0, help="generate.blocks (0: the stage's default)")
    parser.add_argument("--out", default="", help="also write the results as JSON here")
    args = parser.parse_args()
    cfg = load_config(
        "tiny",
        overrides=[
            f"generate.width={args.size}",
            f"generate.height={args.size}",
            f"generate.steps={args.steps}",
            f"generate.batch_size={args.batch_size}",
            f"generate.blocks={args.blocks}",
        ],
    )
    rows = prompts(args.images)
    results = {
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, {platform.python_version()}",
        "work": f"{args.images} images {args.size}x{args.size}, {args.steps} steps, batch {args.batch_size}",
        "blocks": args.blocks or "the stage's default",
    }
    init_ray(RayConfig(num_cpus=4))
    plain_loop(cfg, rows[:4], threads=1)  # warm imports, so plain start-up is construction only
    for actors in (1, 2):
        sized = override(cfg, {"generate.num_actors": actors})
        hosts = Hosts(sized)
        try:
            cold = rates(stage(sized, rows, hosts), args.warmup)
            warm = rates(stage(sized, rows, hosts), args.warmup)
        finally:
            hosts.close()
        plain = rates(plain_loop(sized, rows, threads=actors), args.warmup)
        results[f"{actors}_host"] = {
            "stage_first_call": cold,
            "stage_warm_call": warm,
            "plain": plain,
            "steady_ratio": round(warm["steady_images_per_s"] / plain["steady_images_per_s"], 3),
            "warm_startup_vs_first": round(warm["startup_s"] / cold["startup_s"], 3),
        }
    one, two = results["1_host"]["stage_warm_call"], results["2_host"]["stage_warm_call"]
    results["2_vs_1_host_steady"] = round(two["steady_images_per_s"] / one["steady_images_per_s"], 3)
    print(json.dumps(results, indent=2))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
