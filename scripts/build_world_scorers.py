"""Build the miniature world's two CNN scorers and write them as package data.

    flock /tmp/artaug-heavy.lock .venv/bin/python scripts/build_world_scorers.py

writes artaug/scorers/world/quality.safetensors and alignment.safetensors (float32, ~250 kB each)
and prints each net's held-out numbers on 1000 fresh renders. Seeded, a fixed number of steps, one
torch thread: the same torch gives the same weights. Takes about 5 min (2.5 min per net: ~10 s
rendering, then training) on one busy core of the 2-core CI machine.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from importlib import resources
from pathlib import Path

import torch
from safetensors.torch import save_file

from artaug.scorers.world import ALIGNMENT_WEIGHTS, QUALITY_WEIGHTS
from artaug.scorers.world_training import build_alignment, build_quality, evaluate_alignment, evaluate_quality

STEPS = 2500


def save(net: torch.nn.Module, relative: str) -> Path:
    path = Path(str(resources.files("artaug.scorers").joinpath(relative)))
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().contiguous() for k, v in net.state_dict().items()}, str(path))
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=STEPS)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--only", choices=("quality", "alignment"), default=None)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    torch.set_num_threads(1)
    builds = {
        "quality": (build_quality, evaluate_quality, QUALITY_WEIGHTS),
        "alignment": (build_alignment, evaluate_alignment, ALIGNMENT_WEIGHTS),
    }
    for name, (build, evaluate, relative) in builds.items():
        if args.only not in (None, name):
            continue
        started = time.perf_counter()
        net = build(args.steps, args.seed)
        seconds = time.perf_counter() - started
        path = save(net, relative)
        numbers = {k: round(v, 4) for k, v in evaluate(net).items()}
        print(json.dumps({"net": name, "path": str(path), "build_s": round(seconds, 1), **numbers}))


if __name__ == "__main__":
    main()
