"""Build the miniature world's shipped files (artaug/world.py describes the world).

    .venv/bin/python scripts/build_world.py prompts   # the train / held-out prompt files (seconds)
    .venv/bin/python scripts/build_world.py model     # the synthesis model (~90 min, 2 idle cores)

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
    """Four stages (batch 32, AdamW 1e-3 with a one-cycle schedule): 2,000 steps with the tiny FLUX's
    character-level text encoders (64 tokens), then 2,000 and 3,000 steps from the previous weights
    with the world's word-level ones (32 tokens), then 6,000 steps (data seed 4) with the T5 encoder
    reading each word with the one before it, as the shipped pipeline does. That order is history,
    not design: the first stage ran before the word-level reading was found to bind colours far
    better, the third because the second's samples were still blurry, the fourth because samples
    swapped subject and background and ignored size words; all are kept so the script rebuilds the
    shipped file. Two threads (float sums depend on the count)."""
    import tempfile

    import torch

    from artaug.models.world_flux import WEIGHTS, pretrain_world, save_world_weights

    torch.set_num_threads(2)
    with tempfile.TemporaryDirectory() as scratch:
        weights = os.path.join(scratch, "stage.safetensors")
        pipe, _ = pretrain_world(2000, max_tokens=64, characters=True, previous_word=False)
        for steps in (2000, 3000):
            save_world_weights(pipe.transformer, weights)
            pipe, losses = pretrain_world(steps, start=weights, previous_word=False)
        save_world_weights(pipe.transformer, weights)
        pipe, losses = pretrain_world(6000, seed=4, start=weights)
    save_world_weights(pipe.transformer, os.path.join(ROOT, "artaug", "models", WEIGHTS))
    print(f"final loss (mean of the last 100 steps) {np.mean(losses[-100:]):.4f}")


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("what", choices=["prompts", "model"])
    {"prompts": build_prompts, "model": build_model}[parser.parse_args().what]()
