"""The default `artaug run` timed, and each stage's start-up in round 2 against round 1 (#16's goals:
the run within 6 min on an idle 2-core machine; round k > 1's start-up at most 10% of round 1's).

    .venv/bin/python benchmarks/warm_startup.py [--out DIR] [--run-dir DIR] [--set k=v ...]

One run of the command a user starts (`python -m artaug.cli run`, the miniature world by default) in
its own process, timed from start to exit (install excluded). A stage's start-up is its
`first_work_s` where it runs on warm hosts: from the stage's start until a host, its models loaded and
set, began the first batch (pools, imports, model loads); the critic's stage, which runs no host, has
`first_output_s`: until its first Parquet part, that batch's work included. Round 1 pays the warm
hosts' start and loads; round 2 should pay only the calling tasks. Training is left out of the ratio:
Ray Train starts a worker group per fit (TorchTrainer cannot reuse one), so its start-up is reported
separately. Results:
OUT/warm-startup.json and the run's console output, OUT/warm-startup-console.txt (default
benchmarks/results/).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(ROOT, "benchmarks", "results")
WARM_STAGES = ("generate", "critique", "enhance", "filter")
GOAL_RATIO, GOAL_RUN_S = 0.10, 360


def run(run_dir: str, settings: list[str]) -> tuple[float, str]:
    command = [sys.executable, "-m", "artaug.cli", "run", "--out", run_dir]
    command += [arg for item in settings for arg in ("--set", item)]
    start = time.perf_counter()
    done = subprocess.run(
        command, capture_output=True, text=True, cwd=ROOT, env={**os.environ, "PYTHONUNBUFFERED": "1"}
    )
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        sys.exit(f"artaug run failed ({done.returncode}):\n{(done.stdout + done.stderr)[-4000:]}")
    return seconds, done.stdout


def startups(manifest: dict) -> dict:
    """Per warm stage (and training, apart): each round's start-up and its ratio to round 1's.

    The start-up is `first_work_s` where the stage runs on warm hosts (until a host, its models loaded
    and set, began the first batch) and `first_output_s` otherwise (the critic's stage: until its first
    part, that batch's work included); both are kept. With more than two rounds, `ratio` is the worst
    round's."""
    rounds = manifest["rounds"]
    order = sorted(rounds, key=int)
    out = {}
    for stage in (*WARM_STAGES, "train"):
        entries = [rounds[k].get(stage, {}) for k in order]
        on_hosts = all(e.get("first_work_s") is not None for e in entries)
        measure = "first_work_s" if on_hosts else "first_output_s"
        times = [e.get(measure) for e in entries]
        entry = {"measure": measure, **{f"round {k}": t for k, t in zip(order, times, strict=True)}}
        entry["first_output_s"] = [e.get("first_output_s") for e in entries]
        if len(times) > 1 and times[0] and all(t is not None for t in times[1:]):
            entry["ratio"] = round(max(times[1:]) / times[0], 3)
        out[stage] = entry
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=RESULTS, help="folder for warm-startup.json")
    parser.add_argument("--run-dir", help="run directory (default: a new temporary one)")
    parser.add_argument("--set", action="append", default=[], metavar="K=V", help="a setting for the run")
    args = parser.parse_args()
    run_dir = args.run_dir or os.path.join(tempfile.mkdtemp(prefix="artaug-warm-"), "run")
    load_before = os.getloadavg()
    seconds, output = run(run_dir, args.set)
    with open(os.path.join(run_dir, "manifest.json")) as f:
        manifest = json.load(f)
    figures = startups(manifest)
    warm = [figures[s]["ratio"] for s in WARM_STAGES if "ratio" in figures[s]]
    result = {
        "date": datetime.date.today().isoformat(),
        "machine": {
            "cores": os.cpu_count(),
            "python": platform.python_version(),
            "load_avg_before": load_before,
            "load_avg_after": os.getloadavg(),
        },  # fmt: skip
        "settings": args.set,
        "run_dir": run_dir,
        "run_s": round(seconds, 1),
        "run_goal_s": GOAL_RUN_S,
        "startup_s": figures,
        "worst_warm_ratio": max(warm) if warm else None,
        "ratio_goal": GOAL_RATIO,
        "pools": [line for line in output.splitlines() if " hosts: " in line or " training: " in line],
    }
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "warm-startup.json"), "w") as f:
        json.dump(result, f, indent=2)
    with open(os.path.join(args.out, "warm-startup-console.txt"), "w") as f:
        f.write(output)  # what the user saw (README's sample output)
    print(f"artaug run: {seconds:.0f} s (goal {GOAL_RUN_S} s on an idle 2-core machine)")
    print(f"{'stage':10} {'measure':>15} {'round 1 s':>10} {'round 2 s':>10} {'ratio':>10}")
    for stage, entry in figures.items():
        cells = [entry["measure"], entry.get("round 1"), entry.get("round 2"), entry.get("ratio")]
        print(f"{stage:10} {cells[0]:>15} " + " ".join(f"{'-' if c is None else c:>10}" for c in cells[1:]))
    print(f"worst warm-stage ratio: {result['worst_warm_ratio']} (goal <= {GOAL_RATIO})")


if __name__ == "__main__":
    main()
