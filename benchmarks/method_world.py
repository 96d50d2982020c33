"""Helpers of the method check (benchmarks/method_check.py): the production commands as
subprocesses, pair folders in the enhance stage's format, held-out sampling through the production
model loading and sampler, and the per-image metrics."""

from __future__ import annotations

import dataclasses
import io
import json
import logging
import os
import shutil
import subprocess
import sys
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from PIL import Image

from artaug import storage, world
from artaug.layout import TrainOutput
from artaug.models.sampling import Job, sample
from artaug.models.synthesis import load_pipeline
from artaug.photometric import apply_adjustments
from artaug.rows import PAIR
from artaug.train.pairs import exclusion, read_pairs

log = logging.getLogger("method_check")
ARTAUG = os.path.join(os.path.dirname(sys.executable), "artaug")
# The photometric enhancement: brighter and warmer (exposure and colour temperature +0.16).
ENHANCEMENT = [
    {"aspect": "exposure", "direction": "increase", "strength": 2},
    {"aspect": "color_temperature", "direction": "increase", "strength": 2},
]
WORLD_SCORERS = ("world_quality", "world_alignment", "world_aesthetic")


class Production:
    """`artaug COMMAND ... --preset P --set ...` as subprocesses, each logged to its own file and all
    joining one Ray (the address) when one is given."""

    def __init__(self, preset: str, sets: list[str], logs: str, ray_address: str | None = None):
        self.preset, self.sets, self.logs = preset, list(sets), logs
        if ray_address:
            self.sets.append(f"ray.address={ray_address}")
        os.makedirs(logs, exist_ok=True)
        self.caches: dict[str, str] = {}

    def run(self, name: str, tag: str, *args: str, sets: tuple[str, ...] = ()) -> float:
        command = [ARTAUG, name, *args, "--preset", self.preset]
        for item in [*self.sets, *sets]:
            command += ["--set", item]
        path = os.path.join(self.logs, f"{tag}.log")
        started = time.perf_counter()
        with open(path, "w") as out:
            out.write(" ".join(command) + "\n")
            out.flush()
            done = subprocess.run(command, stdout=out, stderr=subprocess.STDOUT, check=False)
        seconds = time.perf_counter() - started
        if done.returncode != 0:
            with open(path) as f:
                tail = f.read()[-3000:]
            raise RuntimeError(f"{tag}: artaug {name} exited {done.returncode} ({path}):\n{tail}")
        log.info("%s: artaug %s %.0f s", tag, name, seconds)
        return seconds

    def train(self, pairs: str, out: str, seed: int, mode: str, extra=()) -> tuple[str, float, dict]:
        """(LoRA path, seconds, the stage's summary) of one production training run; `extra`: the
        mode's own `--set` items.

        The latent cache (VAE posterior means and text embeddings: no randomness) of the first run
        on `pairs` is copied into later outputs on the same pairs, where the train stage reuses a
        complete cache of the same pair folder, as a resumed run does: ~30 s of actor start-up saved
        per run on 2 cores, the training itself unchanged."""
        tag = f"train-{os.path.basename(os.path.dirname(out))}-{os.path.basename(out)}"
        sets = (f"train.seed={seed}", f"train.mode={mode}", *extra)
        shutil.rmtree(out, ignore_errors=True)  # a run of ours stopped part-way: start it again
        cache = self.caches.get(pairs)
        if cache is not None:
            shutil.copytree(cache, TrainOutput(out).latents)
        try:
            seconds = self.run("train", tag, "--pairs", pairs, "--out", out, sets=sets)
        except RuntimeError:
            if cache is None:
                raise
            log.warning("%s: training on the copied latent cache failed; again without it", tag)
            shutil.rmtree(out, ignore_errors=True)
            seconds = self.run("train", tag, "--pairs", pairs, "--out", out, sets=sets)
        summary = storage.read_summary(out)
        self.caches.setdefault(pairs, TrainOutput(out).latents)
        return summary["lora"], seconds, summary


def png(image: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return buffer.getvalue()


def decode(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


def photometric(images: np.ndarray) -> np.ndarray:
    return np.stack([np.asarray(apply_adjustments(Image.fromarray(im), ENHANCEMENT)[0]) for im in images])


@torch.no_grad()
def sample_images(cfg, loras: list[str], prompts: list[str], seeds: list[int]) -> np.ndarray:
    """uint8 images, one per (prompt, seed), from the configured model with `loras` fused (the
    production loader), sampled as the generate stage samples: its sampler, size, steps, guidance
    and batch size; the same seed gives the same initial noise with or without LoRAs."""
    pipe = load_pipeline(dataclasses.replace(cfg.model, loras=list(loras), device="cpu"))
    g, images = cfg.generate, []
    jobs = [Job(p, s) for p, s in zip(prompts, seeds, strict=True)]
    for start in range(0, len(jobs), g.batch_size):
        batch = jobs[start : start + g.batch_size]
        out = sample(pipe, batch, width=g.width, height=g.height, steps=g.steps, guidance=g.guidance,
                     max_sequence_length=cfg.model.max_sequence_length)  # fmt: skip
        images += [np.asarray(im.convert("RGB")) for im in out]
    return np.stack(images)


def pair_row(cfg, prompt_id: str, prompt: str, seed: int, before: np.ndarray, after: np.ndarray) -> dict:
    g = cfg.generate
    return {
        "prompt_id": prompt_id, "prompt": prompt, "seed": seed, "round": 1, "width": before.shape[1],
        "height": before.shape[0], "steps": g.steps, "guidance": g.guidance, "before": png(before),
        "after": png(after), "enhance_prompt": prompt, "mode": "photometric", "regions": "[]",
        "unchanged": False, "error": None, "seconds": 0.0,
    }  # fmt: skip


def write_pairs(folder: str, rows: list[dict], note: str) -> str:
    """A completed pair folder (the enhance stage's schema and `_SUCCESS` marker)."""
    os.makedirs(folder, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows, schema=PAIR), os.path.join(folder, "part-0.parquet"))
    storage.mark_complete(folder, {"stage": "enhance", "rows": len(rows), "written_by": note})
    return folder


def read_rows(folder: str) -> list[dict]:
    """The pair rows of a pair folder, ordered by their ids."""
    return sorted(read_pairs(folder).to_pylist(), key=lambda r: (r["prompt_id"], r["seed"]))


def null_rows(rows: list[dict]) -> list[dict]:
    """The same pairs with after := before on every trainable row (others kept as they are)."""
    return [{**r, "after": r["before"], "mode": "null"} if exclusion(r) is None else r for r in rows]


def brightness_warmth(images: np.ndarray) -> dict[str, np.ndarray]:
    x = images.astype(np.float64)
    return {"brightness": x.mean(axis=(1, 2, 3)), "warmth": x[..., 0].mean((1, 2)) - x[..., 2].mean((1, 2))}


def content_error(images: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """Per image: RMS pixel error (0..255) to `reference` after a per-channel gain + offset fit, so
    a global colour shift (what the photometric enhancement does) is not counted as content."""
    errors = []
    for im, ref in zip(images.astype(np.float64), reference.astype(np.float64), strict=True):
        residual = []
        for c in range(3):
            a = np.stack([im[..., c].ravel(), np.ones(im[..., c].size)], axis=1)
            coef, *_ = np.linalg.lstsq(a, ref[..., c].ravel(), rcond=None)
            residual.append(ref[..., c].ravel() - a @ coef)
        errors.append(np.sqrt(np.mean(np.square(residual))))
    return np.array(errors)


class WorldScores:
    """The world's scorers from artaug.scorers where they exist; otherwise the measured quality
    `world.quality(world.measure(image, prompt).scene)` alone (named `measured_quality`)."""

    def __init__(self, cfg):
        from artaug.errors import ArtaugError
        from artaug.scorers import SCORERS, build_scorer

        self.scorers = []
        for name in WORLD_SCORERS:
            if name not in SCORERS:
                log.warning("scorer %s does not exist (yet): left out", name)
                continue
            try:
                self.scorers.append(build_scorer(name, cfg.scorers, torch.device("cpu")))
            except (ArtaugError, RuntimeError) as err:  # its weights not built yet, or being rebuilt
                log.warning("scorer %s unavailable: %s", name, err)

    def __call__(self, images: np.ndarray, prompts: list[str]) -> dict[str, np.ndarray]:
        pictures = [Image.fromarray(im) for im in images]
        out = {"measured_quality": np.array([world.quality(world.measure(im, p).scene)
                                             for im, p in zip(images, prompts, strict=True)])}  # fmt: skip
        for scorer in self.scorers:
            out.update(
                {k: np.asarray(v, dtype=np.float64) for k, v in scorer.score(pictures, prompts).items()}
            )
        return out


def metrics(images: np.ndarray, prompts: list[str], scores: WorldScores) -> dict[str, np.ndarray]:
    """Every per-image metric the check compares (content error is computed against the base)."""
    return {**brightness_warmth(images), **scores(images, prompts)}


def load_state(path: str) -> dict:
    if not os.path.exists(path):
        return {}
    with open(path) as f:
        return json.load(f)


def save_json(path: str, record: dict) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    temporary = f"{path}.tmp"
    with open(temporary, "w") as f:
        json.dump(record, f, indent=1, default=float)
    os.replace(temporary, path)
