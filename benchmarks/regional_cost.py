"""Cost of regional regeneration with R regions relative to plain generation (R = 0).

    python benchmarks/regional_cost.py [--size 256] [--steps 8] [--repeats 7]

Same loop (`artaug.models.sampling.sample`), same seed, size and steps; only the number of regions changes.
Each image with R regions costs 1 + R transformer evaluations per step (batched into one forward), so
the ratio approaches 1 + R where the transformer dominates; encoders and the VAE are paid once.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time

os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402

from artaug.config import ModelConfig  # noqa: E402
from artaug.models.sampling import Job, Region, sample  # noqa: E402
from artaug.models.synthesis import load_pipeline  # noqa: E402

BOXES = [(0, 0, 0.5, 0.5), (0.5, 0, 1, 0.5), (0, 0.5, 0.5, 1), (0.5, 0.5, 1, 1)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    torch.set_num_threads(1)
    pipe = load_pipeline(ModelConfig(source="tiny", device="cpu"))
    jobs = {
        regions: Job(
            "a harbour at dusk", 1, [Region(b, f"detail {i}") for i, b in enumerate(BOXES[:regions])]
        )
        for regions in (0, 1, 2, 4)
    }
    for job in jobs.values():
        sample(pipe, [job], args.size, args.size, args.steps, 3.5, 64)  # warm-up
    runs: dict[int, list[float]] = {regions: [] for regions in jobs}
    for _ in range(args.repeats):  # interleaved: a load change on the machine reaches every R alike
        for regions, job in jobs.items():
            start = time.perf_counter()
            sample(pipe, [job], args.size, args.size, args.steps, 3.5, 64)
            runs[regions].append(time.perf_counter() - start)
    seconds = {regions: sorted(times)[len(times) // 2] for regions, times in runs.items()}  # medians
    print(json.dumps({
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}",
        "work": f"tiny FLUX, {args.size}x{args.size}, {args.steps} steps, "
                f"median of {args.repeats} interleaved runs",
        "seconds": {f"R={r}": round(s, 4) for r, s in seconds.items()},
        "ratio_to_plain": {f"R={r}": round(s / seconds[0], 3) for r, s in seconds.items()},
    }, indent=2))  # fmt: skip


if __name__ == "__main__":
    main()
