"""The default `artaug run` with its stages overlapping and without, in one session (#16, item 2).

    .venv/bin/python benchmarks/stage_overlap.py [--repeats N] [--out DIR] [--set k=v ...]

Runs the command a user starts (`python -m artaug.cli run`, the miniature world by default) with
`loop.overlap_stages=true` and `=false`, alternating (on, off, on, off, ...) so that a drift of the
machine's speed falls on both. Per run: its wall time, and per round the two spans the overlap
shortens, from the manifest's stage times (1 s resolution):
- generate + critique: from generate's start to the critique's end;
- filter + latent cache: from the filter's start to the end of the latent cache (the train stage's
  own cache, or the one filled while the filter ran: `train.latent_cache` in the manifest).
Results: OUT/stage-overlap.json (default benchmarks/results/), ratios overlap / sequential.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from machine_facts import run_facts, save_result  # noqa: E402
from warm_startup import RESULTS, run  # noqa: E402 - the same timed `artaug run`

MODES = {"overlap": "loop.overlap_stages=true", "sequential": "loop.overlap_stages=false"}


def _epoch(stamp: str) -> float:
    return datetime.datetime.strptime(stamp, "%Y-%m-%dT%H:%M:%S%z").timestamp()


def spans(run_dir: str) -> dict:
    """Per round: seconds of generate + critique, and of filter + latent cache."""
    with open(os.path.join(run_dir, "manifest.json")) as f:
        rounds = json.load(f)["rounds"]
    out = {}
    for k, stages in sorted(rounds.items(), key=lambda item: int(item[0])):
        gen_crit = _epoch(stages["critique"]["finished"]) - _epoch(stages["generate"]["started"])
        cache_path = os.path.join(run_dir, f"round-{k}", "train", "latents", "_SUCCESS")
        cache_end = os.path.getmtime(cache_path) if os.path.exists(cache_path) else None
        filter_cache = cache_end - _epoch(stages["filter"]["started"]) if cache_end else None
        out[f"round {k}"] = {"generate+critique_s": round(gen_crit, 1),
                             "filter+latent_cache_s": filter_cache and round(filter_cache, 1)}  # fmt: skip
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=1, help="runs per mode (alternating)")
    parser.add_argument("--out", default=RESULTS, help="folder for stage-overlap.json")
    parser.add_argument("--set", action="append", default=[], metavar="K=V", help="a setting for every run")
    args = parser.parse_args()
    root, load_before = tempfile.mkdtemp(prefix="artaug-overlap-"), os.getloadavg()
    runs = {mode: [] for mode in MODES}
    for i in range(args.repeats):
        for mode, setting in MODES.items():
            run_dir = os.path.join(root, f"{mode}-{i}")
            seconds, _ = run(run_dir, [*args.set, setting])
            runs[mode].append({"run_s": round(seconds, 1), "rounds": spans(run_dir)})
            print(f"{mode:10} run {i + 1}: {seconds:.0f} s  {runs[mode][-1]['rounds']}", flush=True)
    median = {mode: statistics.median(r["run_s"] for r in done) for mode, done in runs.items()}
    result = {
        **run_facts(("torch", "ray"), load_before),
        "settings": args.set,
        "runs": runs,
        "median_run_s": median,
        "ratio_overlap_to_sequential": round(median["overlap"] / median["sequential"], 3),
    }
    save_result(args.out, "stage-overlap.json", result)
    print(f"median run: overlap {median['overlap']:.0f} s, sequential {median['sequential']:.0f} s,"
          f" ratio {result['ratio_overlap_to_sequential']}")  # fmt: skip


if __name__ == "__main__":
    main()
