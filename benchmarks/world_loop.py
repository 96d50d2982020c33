"""The miniature world's loop repeated with 5 seeds, and its controls (docs/benchmarks.md, "The
miniature world: the loop with 5 seeds and its controls").

    python benchmarks/world_loop.py --lock /tmp/artaug-heavy.lock     # 20 runs, one after another
    python benchmarks/world_loop.py --reuse                            # continue an interrupted one
    python benchmarks/world_loop.py --analyse-only                     # figures of the finished runs

Each run is the default loop, `artaug run --preset world --set generate.seed=S --set train.seed=S`,
in its own run directory (RUNS_ROOT/VARIANT-seedS). The held-out evaluation prompts and their seeds
are fixed in the preset, so every run scores images of the same base model from the same noise:
runs are paired image by image. Variants:
  world          the default: the world critic, the filter and the loop's gates on;
  random-critic  critique.backend=random (random boxes and vocabulary prompts), the same filter;
  no-filter      the world critic, every pair kept and the loop's gates off;
  random-critic-ungated  the random critic and the same filter with the loop's gates off, so it
                 trains on whatever pairs its random suggestions improved (random-critic's gates
                 usually stop it before any LoRA: this asks what the critic adds beyond selection).
A run the loop's gates stopped is a result, not an error: its manifest says why, and when it
stopped before any LoRA its enhanced model is the base, so each held-out image gains 0.

Figures: per run, the evaluation's own paired differences (metrics.json: world_quality, the
aesthetic, and world_alignment; intervals clustered by prompt); per variant, the per-image
differences of all its seeds pooled, with a bootstrap interval that resamples prompts (a prompt's
images of every seed move together: `artaug.stats.clustered`); and the critic's gain over each
control, per image (world lora - world base) - (control lora - control base), per seed and pooled.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import fcntl
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from importlib import metadata

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402

from artaug.stats import clustered  # noqa: E402

VARIANTS = {
    "world": (),
    "random-critic": ("critique.backend=random",),
    "no-filter": ("filter.delta=-1000", "filter.epsilon=1000", "filter.keep_unchanged=true",
                  "loop.min_acceptance_rate=0", "loop.min_aesthetic_gain=-1000"),
    "random-critic-ungated": ("critique.backend=random", "loop.min_acceptance_rate=0",
                              "loop.min_aesthetic_gain=-1000"),
}  # fmt: skip
COLUMNS = ("world_quality", "world_alignment")  # the verdict's aesthetic and alignment
CONTROLS = ("random-critic", "no-filter", "random-critic-ungated")  # each compared with "world"
DONE = ("finished", "stopped")
ARTAUG = os.path.join(os.path.dirname(sys.executable), "artaug")


# ---------------------------------------------------------------------- running


def run_all(args) -> list[dict]:
    os.makedirs(args.runs_root, exist_ok=True)
    records = []
    for seed in args.seeds:  # seed-major: an interrupted benchmark has whole seeds to compare
        for variant in args.variants:
            records.append(run_one(args, variant, seed))
    return records


def run_one(args, variant: str, seed: int) -> dict:
    name = f"{variant}-seed{seed}"
    run_dir = os.path.join(args.runs_root, name)
    timing = os.path.join(args.runs_root, f"{name}.json")  # beside the run directory, not in it
    record = {"run": name, "variant": variant, "seed": seed, "run_dir": run_dir}
    if (args.reuse or args.analyse_only) and _status(run_dir) in DONE:
        print(f"{name}: {_status(run_dir)} earlier, reused", flush=True)
        return {**record, **_read_json(timing, {"wall_s": None}), "reused": True}
    if args.analyse_only:
        return {**record, "missing": True}
    if os.path.exists(run_dir):  # an unfinished attempt is run again whole, so wall times compare
        shutil.rmtree(run_dir)
    command = [ARTAUG, "run", "--preset", "world", "--out", run_dir,
               "--set", f"generate.seed={seed}", "--set", f"train.seed={seed}"]  # fmt: skip
    for item in VARIANTS[variant]:
        command += ["--set", item]
    log = os.path.join(args.runs_root, f"{name}.log")
    with _locked(args.lock), open(log, "w") as out:  # the wall time excludes waiting for the lock
        started = time.perf_counter()
        exit_code = subprocess.run(command, stdout=out, stderr=subprocess.STDOUT, check=False).returncode
        wall = time.perf_counter() - started
    facts = {"command": " ".join(command), "exit_code": exit_code, "wall_s": round(wall, 1), "log": log,
             "load_after": list(os.getloadavg()), "git": _git_state()}  # fmt: skip
    with open(timing, "w") as f:
        json.dump(facts, f, indent=2)
    print(f"{name}: exit {exit_code}, {_status(run_dir)}, {wall:.0f} s", flush=True)
    return {**record, **facts, "reused": False}


@contextlib.contextmanager
def _locked(path: str | None):
    """flock(2) on `path`: the same lock `flock PATH command` takes, held for one run at a time."""
    if not path:
        yield
        return
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _git_state() -> str:
    """The commit a run measured, "+dirty" when artaug/ had uncommitted changes (runs of one benchmark
    should share it: a preset or model changed between runs makes them incomparable)."""
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    git = lambda *a: subprocess.run(["git", "-C", repo, *a], capture_output=True, text=True).stdout.strip()  # noqa: E731
    return git("rev-parse", "--short", "HEAD") + ("+dirty" if git("status", "--porcelain", "artaug") else "")


def _status(run_dir: str) -> str | None:
    return _read_json(os.path.join(run_dir, "manifest.json"), {}).get("status")


def _read_json(path: str, default: dict) -> dict:
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return default


# ---------------------------------------------------------------------- reading one run


def load_run(record: dict) -> dict:
    """The run's outcome and per-image differences: {prompt_id: {"prompt", COLUMN: lora - base,
    COLUMN_base}}; a run stopped before any LoRA has differences 0 (its enhanced model is the base)."""
    run_dir = record["run_dir"]
    manifest = _read_json(os.path.join(run_dir, "manifest.json"), {})
    rounds = manifest.get("rounds", {})
    out = {
        **record,
        "status": manifest.get("status", "missing"),
        "stopped_early": manifest.get("stopped_early"),
        "acceptance_rates": [
            rounds[k].get("filter", {}).get("metrics", {}).get("acceptance_rate")
            for k in sorted(rounds, key=int)
        ],  # fmt: skip
        "images": None,
    }
    metrics = _read_json(os.path.join(run_dir, "evaluate", "metrics.json"), {})
    if metrics:
        out["scores"] = {c: _summary(metrics["scores"][c]) for c in COLUMNS if c in metrics["scores"]}
        out["verdict"] = metrics.get("verdict")
        out["images"] = _scored_images(os.path.join(run_dir, "evaluate", "scores"))
    elif out["status"] == "stopped":
        out["images"] = _unchanged_images(run_dir)
        zero = {"base": None, "lora": None, "difference": 0.0, "ci": [0.0, 0.0], "pairs": len(out["images"])}
        out["scores"] = {c: dict(zero) for c in COLUMNS}
        out["note"] = "stopped before any LoRA: enhanced model = base, every difference 0"
    return out


def _summary(score: dict) -> dict:
    return {"base": score["base"]["mean"], "lora": score["lora"]["mean"], "pairs": score["pairs"],
            "difference": score["difference"]["mean"], "ci": score["difference"]["ci"]}  # fmt: skip


def _scored_images(scores_dir: str) -> dict:
    from artaug.stages.contract import read_stage

    wanted = ["prompt", *(f"{c}_{side}" for c in COLUMNS for side in ("base", "lora"))]
    rows = read_stage(scores_dir, wanted).to_pylist()
    images = {}
    for row in rows:
        entry = {"prompt": row["prompt"]}
        for c in COLUMNS:
            base, lora = _number(row.get(f"{c}_base")), _number(row.get(f"{c}_lora"))
            entry[c], entry[f"{c}_base"] = lora - base, base
        images[row["prompt_id"]] = entry
    return images


def _unchanged_images(run_dir: str) -> dict:
    """The run's own held-out set (its run.yaml), every difference 0 and no base score."""
    from artaug.config import load_config
    from artaug.loop.prompt_sets import eval_prompts

    cfg = load_config(path=os.path.join(run_dir, "run.yaml"))
    return {
        row["prompt_id"]: {
            "prompt": row["prompt"],
            **{c: 0.0 for c in COLUMNS},
            **{f"{c}_base": float("nan") for c in COLUMNS},
        }  # fmt: skip
        for row in eval_prompts(cfg).rows
    }


def _number(value) -> float:
    return float("nan") if value is None else float(value)


# ---------------------------------------------------------------------- across runs


def analyse(runs: list[dict], samples: int) -> dict:
    usable = {(r["variant"], r["seed"]): r for r in runs if r.get("images") is not None}
    variants = {}
    for variant in dict.fromkeys(r["variant"] for r in runs):
        seeds = sorted(s for v, s in usable if v == variant)
        images = [usable[(variant, s)]["images"] for s in seeds]
        variants[variant] = {"seeds": seeds, **{c: _pooled(images, c, samples) for c in COLUMNS}}
    comparisons = {}
    for control in CONTROLS:
        seeds = sorted(s for v, s in usable if v == control and ("world", s) in usable)
        if not seeds:
            continue
        pairs = [(usable[("world", s)]["images"], usable[(control, s)]["images"]) for s in seeds]
        entry = comparisons[f"world - {control}"] = {
            "seeds": seeds,
            "bases_max_abs_difference": _base_gap(pairs),
        }
        for c in COLUMNS:
            gains = [_minus(a, b, c) for a, b in pairs]
            entry[c] = {
                "per_seed": {str(s): _pooled([g], c, samples) for s, g in zip(seeds, gains, strict=True)},
                "pooled": _pooled(gains, c, samples),
            }
    return {"variants": variants, "comparisons": comparisons}


def _minus(first: dict, second: dict, column: str) -> dict:
    """Per image of both runs: first's difference - second's (the same held-out image)."""
    return {pid: {"prompt": row["prompt"], column: row[column] - second[pid][column]}
            for pid, row in first.items() if pid in second}  # fmt: skip


def _pooled(image_sets: list[dict], column: str, samples: int) -> dict:
    """Mean over every image of every set, with an interval that resamples prompts (all their rows)."""
    values = [row[column] for images in image_sets for row in images.values()]
    prompts = [row["prompt"] for images in image_sets for row in images.values()]
    if not values:
        return {"n": 0, "mean": None, "ci": None}
    result = clustered(values, prompts, samples=samples, seed=0)
    finite = np.asarray(values, dtype=np.float64)
    result["positive_share"] = float((finite[np.isfinite(finite)] > 0).mean()) if result["n"] else None
    return result


def _base_gap(pairs: list[tuple[dict, dict]]) -> float | None:
    """Largest |base score| difference between paired images: ~0 when the runs are truly paired."""
    gaps = [
        abs(a[pid][f"{c}_base"] - b[pid][f"{c}_base"])
        for a, b in pairs
        for pid in a
        if pid in b
        for c in COLUMNS
    ]
    gaps = [g for g in gaps if np.isfinite(g)]
    return max(gaps) if gaps else None


# ---------------------------------------------------------------------- presentation


def markdown(runs: list[dict], figures: dict) -> str:
    lines = ["| variant | seed | status | acceptance per round | aesthetic gain [95% CI] |"
             " alignment diff [95% CI] | wall s |", "|---|---|---|---|---|---|---|"]  # fmt: skip
    for r in runs:
        scores = r.get("scores", {})
        rates = ", ".join("-" if a is None else f"{a:.2f}" for a in r.get("acceptance_rates", []))
        status = r["status"] + (f" (round {r['stopped_early']['round']})" if r.get("stopped_early") else "")
        wall = "" if r.get("wall_s") is None else f"{r['wall_s']:.0f}"
        quality, alignment = _ci(scores.get("world_quality")), _ci(scores.get("world_alignment"))
        lines.append(
            f"| {r['variant']} | {r['seed']} | {status} | {rates} | {quality} | {alignment} | {wall} |"
        )
    lines += ["", "| pooled over seeds (prompt-clustered CI) | seeds | aesthetic gain [95% CI] |"
              " alignment diff [95% CI] | images |", "|---|---|---|---|---|"]  # fmt: skip
    rows = [(name, v) for name, v in figures["variants"].items()]
    for name, c in figures["comparisons"].items():
        rows.append((name, {**c, **{k: c[k]["pooled"] for k in COLUMNS}}))
    for name, v in rows:
        seeds = ",".join(str(s) for s in v["seeds"])
        lines.append(f"| {name} | {seeds} | {_ci(v['world_quality'])} | {_ci(v['world_alignment'])} |"
                     f" {v['world_quality'].get('n', '')} |")  # fmt: skip
    for name, c in figures["comparisons"].items():
        per_seed = "; ".join(f"seed {s}: {_ci(x)}" for s, x in c["world_quality"]["per_seed"].items())
        gap = c["bases_max_abs_difference"]
        lines.append(f"\n{name}, aesthetic per seed: {per_seed}; largest |base score difference| {gap}")
    states = sorted({r["git"] for r in runs if r.get("git")})
    if len(states) > 1:
        lines.append(f"\nWarning: the runs measured different code: {', '.join(states)}")
    return "\n".join(lines)


def _ci(score: dict | None) -> str:
    if not score:
        return "-"
    mean = score.get("difference", score.get("mean"))
    if mean is None:
        return "-"
    ci = score.get("ci")
    return f"{mean:+.4f} [{ci[0]:+.4f}, {ci[1]:+.4f}]" if ci else f"{mean:+.4f}"


def machine() -> dict:
    versions = {}
    for name in ("torch", "ray", "diffusers", "deepspeed"):
        with contextlib.suppress(metadata.PackageNotFoundError):
            versions[name] = metadata.version(name)
    return {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
            "packages": versions}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS))
    parser.add_argument("--runs-root", default="/tmp/artaug-world-loop", help="where the run dirs go")
    parser.add_argument(
        "--out", default="benchmarks/results/world_loop", help="folder for the JSON and table"
    )
    parser.add_argument("--reuse", action="store_true", help="skip runs whose run dir already finished")
    parser.add_argument("--analyse-only", action="store_true", help="start no run; figures of finished ones")
    parser.add_argument("--lock", help="hold flock(2) on this file during each run (another job's lock)")
    parser.add_argument("--bootstrap-samples", type=int, default=2000)
    args = parser.parse_args()
    facts = {"started": datetime.datetime.now().isoformat(timespec="seconds"), **machine(),
             "load_at_start": list(os.getloadavg())}  # fmt: skip
    records = run_all(args)
    runs = [load_run(r) for r in records if not r.get("missing")]
    figures = analyse(runs, args.bootstrap_samples)
    facts["finished"] = datetime.datetime.now().isoformat(timespec="seconds")
    facts["load_at_end"] = list(os.getloadavg())
    table = markdown(runs, figures)
    os.makedirs(args.out, exist_ok=True)
    shown = [{k: v for k, v in r.items() if k != "images"} for r in runs]
    sets = {v: list(VARIANTS[v]) for v in args.variants}
    result = {"machine": facts, "seeds": args.seeds, "variants": sets, "runs": shown, **figures}
    with open(os.path.join(args.out, "world_loop.json"), "w") as f:
        json.dump(result, f, indent=2)
    with open(os.path.join(args.out, "world_loop.md"), "w") as f:
        f.write(table + "\n")
    print(table)


if __name__ == "__main__":
    main()
