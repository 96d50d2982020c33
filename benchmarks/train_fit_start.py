"""One LoRA fit on a private local Ray, with Ray Train's defaults and with artaug's local settings.

    .venv/bin/python benchmarks/train_fit_start.py [--repeats N] [--fits K] [--pairs P] [--out DIR]

On a private local Ray `artaug.train.trainer` turns off Ray Train's preemption watcher and metrics and
polls the workers every 0.5 s (`LOCAL_TRAIN_ENV`). This runs the same fit (the tiny preset's
differential training, 2 workers, on one latent cache built first) in fresh processes, alternating
Ray Train's defaults (set explicitly, which artaug keeps) and artaug's settings, so that a drift of the
machine's speed falls on both. Each process starts its own Ray, then times `fit` K times (each fit
starts its own controller and worker group); Ray's own start is not timed. Per fit: wall seconds and
the seconds spent in training steps (`busy_s`). Results: OUT/train-fit-start.json (default
benchmarks/results/), the ratio artaug / defaults of the median fit.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # for tests.pairs
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from machine_facts import run_facts, save_result  # noqa: E402

RESULTS = os.path.join(ROOT, "benchmarks", "results")
RAY_DEFAULTS = {
    "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "1",
    "RAY_TRAIN_METRICS_ENABLED": "1",
    "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "2.0",
}


def child(cache: str, root: str, fits: int) -> None:
    """In a fresh process: a private Ray, then `fits` timed fits; prints one JSON line."""
    import time

    from artaug.cluster import init_ray
    from artaug.config import load_config
    from artaug.train.trainer import fit

    cfg = load_config("tiny")
    init_ray(cfg.ray)
    times = []
    for k in range(fits):
        start = time.perf_counter()
        summary = fit(cfg, cache, os.path.join(root, f"fit-{k}"))
        times.append({"fit_s": round(time.perf_counter() - start, 2), "busy_s": summary["busy_s"]})
    print("FITS " + json.dumps(times), flush=True)


def build_cache(root: str, pairs: int) -> str:
    from artaug.cluster import init_ray
    from artaug.config import load_config
    from artaug.stages.train import encode_pairs
    from tests.pairs import pair_row, write_pairs

    cfg = load_config("tiny")
    init_ray(cfg.ray)
    folder = write_pairs(os.path.join(root, "pairs"), [pair_row(i) for i in range(pairs)])
    cache = os.path.join(root, "latents")
    encode_pairs(cfg, folder, cache)
    return cache


def run_child(mode: str, cache: str, root: str, fits: int) -> list[dict]:
    env = {k: v for k, v in os.environ.items() if k not in RAY_DEFAULTS and k != "RAY_ADDRESS"}
    env |= RAY_DEFAULTS if mode == "ray defaults" else {}
    env["PYTHONPATH"] = ROOT
    done = subprocess.run(
        [sys.executable, __file__, "--child", cache, "--root", root, "--fits", str(fits)],
        env=env, capture_output=True, text=True, timeout=1800,
    )  # fmt: skip
    lines = [line for line in done.stdout.splitlines() if line.startswith("FITS ")]
    if done.returncode != 0 or not lines:
        raise RuntimeError(f"{mode}: {(done.stdout + done.stderr)[-3000:]}")
    return json.loads(lines[-1].removeprefix("FITS "))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=2, help="processes per mode (alternating)")
    parser.add_argument("--fits", type=int, default=2, help="fits per process")
    parser.add_argument("--pairs", type=int, default=8, help="pairs in the latent cache")
    parser.add_argument("--out", default=RESULTS, help="folder for train-fit-start.json")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--root", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child, args.root, args.fits)
        return
    root, load_before = tempfile.mkdtemp(prefix="artaug-fit-start-"), os.getloadavg()
    cache = build_cache(root, args.pairs)
    import ray

    ray.shutdown()
    fits = {"ray defaults": [], "artaug local": []}
    for i in range(args.repeats):
        for mode in fits:
            done = run_child(mode, cache, os.path.join(root, f"{mode.replace(' ', '-')}-{i}"), args.fits)
            fits[mode] += done
            print(f"{mode:13} process {i + 1}: " + ", ".join(f"{f['fit_s']:.1f} s" for f in done), flush=True)
    median = {mode: statistics.median(f["fit_s"] for f in done) for mode, done in fits.items()}
    result = {
        **run_facts(("torch", "ray", "deepspeed"), load_before),
        "ray_defaults": RAY_DEFAULTS,
        "fits": fits,
        "median_fit_s": median,
        "ratio_artaug_to_defaults": round(median["artaug local"] / median["ray defaults"], 3),
    }
    save_result(args.out, "train-fit-start.json", result)
    print(f"median fit: Ray Train defaults {median['ray defaults']:.1f} s, artaug local"
          f" {median['artaug local']:.1f} s, ratio {result['ratio_artaug_to_defaults']}")  # fmt: skip


if __name__ == "__main__":
    main()
