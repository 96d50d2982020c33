"""LoRA training throughput: Ray Train + DeepSpeed ZeRO-2 against a plain single-process peft loop.

    python benchmarks/train_throughput.py
    python benchmarks/train_throughput.py --pairs 32 --size 256 --steps 40 --batch 4

Equal work on both sides: the same tiny FLUX transformer, latent cache, LoRA (targets, rank,
alpha), AdamW, gradient clipping, global batch, and the training loop's own sampler and objective.
Equal threads: k workers x 1 torch thread against the plain loop with k torch threads. Start-up is
the time from the call until the first optimizer step is done (Ray's own start excluded; worker
processes, imports, model build, DeepSpeed initialize); steady state is the median step time after
`--warmup` steps, per training sample. The plain loop is timed just before and just after each Ray
run and averaged, because the load on a shared machine drifts. Ratios come from this one run.
Checkpoints are saved only at the end of the Ray run (not timed as steps).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import statistics
import sys
import tempfile
import time

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # for tests.pairs

import torch  # noqa: E402

from artaug.cluster import init_ray  # noqa: E402
from artaug.config import RayConfig, load_config  # noqa: E402
from artaug.models.flow_matching import flow_matching_loss  # noqa: E402
from artaug.models.synthesis import load_transformer  # noqa: E402
from artaug.stages.train import encode_pairs  # noqa: E402
from artaug.train.data import CachedPairs, mix_seed, sample_indices  # noqa: E402
from artaug.train.trainer import fit  # noqa: E402
from tests.pairs import pair_row, write_pairs  # noqa: E402


def plain_loop(cfg, cache_dir: str, threads: int) -> dict:
    """The baseline: peft LoRA + torch AdamW in this process, one optimizer step per global batch."""
    from peft import LoraConfig

    torch.set_num_threads(threads)
    t = cfg.train
    start = time.perf_counter()
    data = CachedPairs(cache_dir)
    transformer = load_transformer(cfg.model, torch.device("cpu"), torch.float32).requires_grad_(False)
    torch.manual_seed(mix_seed(t.seed, 0, 0xADA))
    config = LoraConfig(r=t.rank, lora_alpha=t.alpha, target_modules=list(t.target_modules))
    transformer.add_adapter(config)
    params = [p for p in transformer.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=t.learning_rate, weight_decay=t.weight_decay)
    flat = dataclasses.replace(t, num_workers=1, micro_batch_size=t.micro_batch_size * t.num_workers)
    steps, first_done = [], None
    for step in range(1, t.steps + 1):
        began = time.perf_counter()
        indices = sample_indices(len(data), t.seed, 0, step, 0, 0, flat)
        generator = torch.Generator().manual_seed(mix_seed(t.seed, 0, step, 0, 0))
        loss = flow_matching_loss(
            transformer,
            torch.stack([data.latents["after"][i] for i in indices]),
            torch.stack([data.prompt_embeds[i] for i in indices]),
            torch.stack([data.pooled[i] for i in indices]),
            generator,
            t.guidance,
        )
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, t.max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        steps.append(time.perf_counter() - began)
        first_done = first_done or time.perf_counter() - start
    return {"startup_s": first_done, "steps": steps, "batch": len(indices)}


def ray_run(cfg, cache_dir: str) -> dict:
    """The training stage's TorchTrainer (Ray already up), read back from its metrics."""
    with tempfile.TemporaryDirectory() as out:
        start = time.time()
        summary = fit(cfg, cache_dir, out)
        lines = [json.loads(line) for line in open(os.path.join(out, "lora", "metrics.jsonl"))]
    return {
        "startup_s": lines[0]["time"] - start,
        "steps": [line["seconds"] for line in lines],
        "batch": lines[0]["samples"],
        "total_s": summary["seconds"],
    }


def rates(run: dict, warmup: int) -> dict:
    steady = statistics.median(run["steps"][warmup:])
    return {
        "startup_s": round(run["startup_s"], 3),
        "steady_ms_per_sample": round(1000 * steady / run["batch"], 3),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=32)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--warmup", type=int, default=5, help="steps counted as start-up")
    parser.add_argument("--batch", type=int, default=4, help="global batch (samples per optimizer step)")
    parser.add_argument("--out", default="", help="also write the results as JSON here")
    args = parser.parse_args()
    init_ray(RayConfig(num_cpus=4))
    work = tempfile.mkdtemp(prefix="artaug-bench-")
    pairs = write_pairs(
        os.path.join(work, "pairs"), [pair_row(i, args.size, args.size) for i in range(args.pairs)]
    )
    cache_dir = os.path.join(work, "latents")
    encode_pairs(load_config("tiny"), pairs, cache_dir)
    results = {
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}",
        "work": f"{args.pairs} pairs {args.size}x{args.size}, {args.steps} steps, global batch {args.batch}",
    }
    plain_loop(configure(args, 1), cache_dir, threads=1)  # warm imports so plain start-up is construction
    for workers in (1, 2):
        cfg = configure(args, workers)
        # The plain loop runs just before and just after the Ray run: on a shared machine the load
        # drifts, and bracketing keeps the two sides measured under the same conditions.
        before = rates(plain_loop(cfg, cache_dir, threads=workers), args.warmup)
        ray_side = rates(ray_run(cfg, cache_dir), args.warmup)
        after = rates(plain_loop(cfg, cache_dir, threads=workers), args.warmup)
        plain = {key: round((before[key] + after[key]) / 2, 3) for key in before}
        results[f"{workers}_worker"] = {
            "ray_deepspeed": ray_side,
            "plain": plain,
            "plain_before_after_ms_per_sample": [
                before["steady_ms_per_sample"],
                after["steady_ms_per_sample"],
            ],
            "steady_ratio": round(ray_side["steady_ms_per_sample"] / plain["steady_ms_per_sample"], 3),
            "startup_ratio": round(ray_side["startup_s"] / plain["startup_s"], 3),
            "load_average_1min": round(os.getloadavg()[0], 1),
        }
    print(json.dumps(results, indent=2))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=2)


def configure(args, workers: int):
    if args.batch % workers:
        raise SystemExit(f"--batch {args.batch} is not divisible by {workers} workers")
    return load_config(
        "tiny",
        overrides=[
            "train.mode=direct",
            f"train.steps={args.steps}",
            f"train.num_workers={workers}",
            f"train.micro_batch_size={args.batch // workers}",
            f"train.checkpoint_every={args.steps + 1}",
            "train.max_failures=0",
        ],
    )


if __name__ == "__main__":
    main()
