"""Build the miniature world's shipped files (artaug/world.py describes the world).

    .venv/bin/python scripts/build_world.py prompts       # the train / held-out prompt files (seconds)
    .venv/bin/python scripts/build_world.py model         # the synthesis model's weights (~15 min, 2 cores)

Both are seeded, so a rebuild gives the same files. The held-out prompts and seeds were fixed on
2026-12-01, before any tuning of the world's presets, and must not change to make a result pass.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import numpy as np  # noqa: E402

from artaug import world  # noqa: E402

PRESETS = os.path.join(ROOT, "artaug", "presets")
HELD_OUT, SEEDS, SHUFFLE = 48, (9001, 9002), 20261201
PRETRAIN_STEPS = 4000


def build_prompts() -> None:
    """168 scenes shuffled once: the first 48 held out (x 2 seeds) for evaluation, the rest to train on."""
    scenes = world.scenes()
    order = np.random.default_rng(SHUFFLE).permutation(len(scenes))
    held, train = [scenes[i] for i in order[:HELD_OUT]], [scenes[i] for i in order[HELD_OUT:]]
    with open(os.path.join(PRESETS, "world_train_prompts.txt"), "w") as out:
        out.write("".join(world.prompt(*s) + "\n" for s in train))
    with open(os.path.join(PRESETS, "world_eval_prompts.jsonl"), "w") as out:
        for number, scene in enumerate(held, 1):
            for seed in SEEDS:
                row = {
                    "prompt_id": f"held-{number:02d}-seed{seed}",
                    "prompt": world.prompt(*scene),
                    "seed": seed,
                }
                out.write(json.dumps(row) + "\n")


def build_model() -> None:
    import torch

    from artaug.models.world_flux import WEIGHTS, pretrain_world, save_world_weights

    torch.set_num_threads(2)
    pipe, losses = pretrain_world(PRETRAIN_STEPS)
    save_world_weights(pipe.transformer, os.path.join(ROOT, "artaug", "models", WEIGHTS))
    print(f"final loss (mean of the last 100 steps) {np.mean(losses[-100:]):.4f}")


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("what", choices=["prompts", "model"])
    {"prompts": build_prompts, "model": build_model}[parser.parse_args().what]()
