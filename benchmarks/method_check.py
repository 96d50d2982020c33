"""The method check: does a LoRA trained by `artaug train` on (before, after) pairs move the model's
own images toward the enhancement, on prompts and seeds it never saw, and how much else changes?

    python benchmarks/method_check.py                 # world preset, 5 seeds, 1.5-2 h on 2 idle cores
    python benchmarks/method_check.py --quick         # 1 seed, few prompts: a look, or a debug run
    python benchmarks/method_check.py --preset tiny --set model.source=DIR --critic heuristic  # other models

Everything goes through the production path: training is `artaug train --pairs PAIRS --preset P
--set train.seed=S --set train.mode=M` (Ray Train + DeepSpeed, the preset's guidance, targets, rank,
learning rate, steps), every call joining one Ray started here; held-out images come from
`load_pipeline` with `model.loras` and the generate stage's sampler, size, steps and guidance, base
and base + LoRA from the same noise.

Two enhancements, each turned into a pair folder in the enhance stage's format:
- photometric: the base model's own samples on the training prompts, the after image brighter and
  warmer (artaug.photometric, exposure and colour temperature +0.16). Transfer = the LoRA's mean
  shift of the statistic / the shift the enhancement itself applies to the same held-out base images.
- stages: `artaug generate` -> `artaug critique` (the world critic) -> `artaug enhance`: the
  project's own regional enhancement in the miniature world. Measured with the world's scorers.

Variants per training seed: differential, direct, pairwise-average (the preset's subsets), and two
controls on the same pairs with after := before: LoRA-1 alone (direct on the before images) and a
null enhancement (differential on after = before). Per held-out image, difference = metric(base +
LoRA) - metric(base); means with 95% bootstrap intervals clustered by prompt (a prompt's seeds are
resampled together). Across seeds: the mean of per-seed means, and the interval of the per-image
differences averaged over seeds. Each variant minus the null control, paired per image: what the
enhancement adds beyond training on pictures of the model's own. Content error = RMS pixel error
(0..255) to the base image after removing a per-channel gain and offset (a global colour shift is not
content).

Prompts and seeds are fixed here before any result was seen: training on the first TRAIN_PROMPTS
lines of the world's train prompts (artaug/presets/world_train_prompts.txt) x sample seeds 0, 1;
held out: the world's evaluation set (world_eval_prompts.jsonl: 48 other prompts x seeds 9001, 9002).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import statistics
import subprocess
import sys
import time
from importlib import resources

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import method_report  # noqa: E402
import method_world as mw  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from artaug import storage  # noqa: E402
from artaug.config import load_config  # noqa: E402
from artaug.stats import clustered  # noqa: E402

TRAIN_PROMPTS, TRAIN_SEEDS = 32, (0, 1)
QUICK = {"train_prompts": 8, "heldout_prompts": 8, "seeds": [0]}
DPO_SLOW = "dpo lr/10 (set after)"
PER_PAIR_EXACT = "per-pair exact (after)"
VARIANTS = {  # name -> (train.mode, trained on the null pairs)
    "differential": ("differential", False),
    "direct": ("direct", False),
    "pairwise-average": ("pairwise-average", False),
    "per-pair": ("per-pair", False),
    PER_PAIR_EXACT: ("per-pair", False),
    "dpo": ("dpo", False),
    DPO_SLOW: ("dpo", False),
    "LoRA-1 alone (control)": ("direct", True),
    "null enhancement (control)": ("differential", True),
}
# A mode's own settings on top of the preset's, fixed before any result. per-pair fits one image per
# phase: 10 steps of 4 noise draws each (the preset's micro-batch) per phase and pair, where the other
# modes take the preset's 40 steps per phase over all pairs; its cost column shows what that costs.
# dpo keeps the defaults a user gets: its one phase of the preset's 40 steps, train.dpo_beta 500.
# DPO_SLOW was added after dpo's first results (both implicit rewards falling: once the sigmoid
# saturates, Adam's normalised steps keep moving the LoRA): the same at a tenth of the learning rate.
# PER_PAIR_EXACT was added after per-pair's (its mean cut to rank 8 lost ~60% of the norm): the mean
# kept exact (rank pairs x 8), to tell the fits from the cut.
VARIANT_SETS = {
    "per-pair": ("train.steps=10", "train.before_steps=10"),
    DPO_SLOW: ("train.learning_rate=0.0002",),
    PER_PAIR_EXACT: ("train.steps=10", "train.before_steps=10", "train.pair_exact_rank=512"),
}
FOLDER_TAGS = {DPO_SLOW: "-lr0.0002", PER_PAIR_EXACT: "-exact"}  # a variant's runs beside its mode's others
COLUMNS = {  # what the table shows per enhancement: (metric, label, as a transfer)
    "photometric": [("brightness", "brightness transfer", True), ("warmth", "warmth transfer", True)],
    "stages": [("world_quality", "d world_quality", False), ("world_alignment", "d world_alignment", False),
               ("world_aesthetic", "d world_aesthetic", False)],
}  # fmt: skip
log = logging.getLogger("method_check")


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--preset", default="world")
    p.add_argument("--set", dest="sets", action="append", default=[], metavar="SECTION.FIELD=VALUE",
                   help="passed to every artaug command and to the in-process model loading")  # fmt: skip
    p.add_argument("--critic", default="world", help="critique.backend of the stages enhancement")
    p.add_argument("--enhancements", nargs="+", default=list(COLUMNS), choices=list(COLUMNS))
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4], help="train.seed values")
    p.add_argument("--train-prompts", type=int, default=TRAIN_PROMPTS)
    p.add_argument("--heldout-prompts", type=int, default=48, help="the first N of the world's eval set")
    p.add_argument("--quick", action="store_true", help="1 seed, 8 training and 8 held-out prompts")
    p.add_argument("--work", default="/tmp/artaug-method-check", help="pairs, LoRAs, logs; kept to resume")
    p.add_argument("--out", default="benchmarks/results", help="folder of the JSON record")
    p.add_argument("--report-only", action="store_true", help="no training: the figures of the runs done")
    p.add_argument("--threads", type=int, default=1, help="torch threads of the in-process sampling")
    args = p.parse_args()
    if args.quick:
        vars(args).update(QUICK)
    return args


def fixed_prompts(args):
    """(training prompts, sample seeds), (held-out prompts, seeds): chosen before any result."""
    presets = resources.files("artaug.presets")
    lines = [line.strip() for line in presets.joinpath("world_train_prompts.txt").read_text().splitlines()]
    train = [line for line in lines if line][: args.train_prompts]
    rows = [
        json.loads(line) for line in presets.joinpath("world_eval_prompts.jsonl").read_text().splitlines()
    ]
    names = list(dict.fromkeys(r["prompt"] for r in rows))[: args.heldout_prompts]
    held = [r for r in rows if r["prompt"] in names]
    assert not set(train) & set(names), "held-out prompts must not be trained on"
    jobs = [(f"t{i:03d}-s{s}", p, s) for i, p in enumerate(train) for s in TRAIN_SEEDS]
    return jobs, ([r["prompt"] for r in held], [r["seed"] for r in held])


def start_ray() -> str:
    """One private Ray for the whole check (every artaug command joins it); it stops with us."""
    import ray

    ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False,
             object_store_memory=2**30, runtime_env={"env_vars": {"OMP_NUM_THREADS": "1"}})  # fmt: skip
    # joined over loopback: the commands then see one machine's disk (a node IP would read as remote)
    return "127.0.0.1:" + ray.get_runtime_context().gcs_address.rsplit(":", 1)[1]


def photometric_pairs(cfg, work: str, jobs) -> str:
    folder = os.path.join(work, "photometric", "pairs")
    if not storage.is_complete(folder):
        ids, prompts, seeds = zip(*jobs, strict=True)
        before = mw.sample_images(cfg, [], list(prompts), list(seeds))
        rows = [
            mw.pair_row(cfg, *job, b, a)
            for job, b, a in zip(jobs, before, mw.photometric(before), strict=True)
        ]
        mw.write_pairs(folder, rows, "benchmarks/method_check.py (photometric)")
    return folder


def stage_pairs(prod: mw.Production, args, work: str, jobs) -> str:
    root = os.path.join(work, "stages")
    os.makedirs(root, exist_ok=True)
    prompts = os.path.join(root, "prompts.jsonl")
    with open(prompts, "w") as f:
        f.writelines(json.dumps({"prompt_id": i, "prompt": p, "seed": s}) + "\n" for i, p, s in jobs)
    steps = [
        ("generate", ("--prompts", prompts), ()),
        ("critique", ("--images", f"{root}/generate"), (f"critique.backend={args.critic}",)),
        ("enhance", ("--images", f"{root}/generate", "--critiques", f"{root}/critique"), ()),
    ]
    for name, inputs, sets in steps:
        if not storage.is_complete(os.path.join(root, name)):
            prod.run(name, f"stages-{name}", *inputs, "--out", root, "--overwrite", sets=sets)
    return os.path.join(root, "enhance")


def pair_effect(pairs: str, scores) -> dict:
    """What the enhancement itself does to its trainable training pairs: after - before per metric."""
    everything = mw.read_rows(pairs)
    rows = [r for r in everything if mw.exclusion(r) is None]
    if not rows:
        raise SystemExit(f"{pairs}: no pair to train on (every row is unchanged or an error)")
    prompts = [r["prompt"] for r in rows]
    before = np.stack([mw.decode(r["before"]) for r in rows])
    after = np.stack([mw.decode(r["after"]) for r in rows])
    a, b = mw.metrics(before, prompts, scores), mw.metrics(after, prompts, scores)
    out = {k: clustered(b[k] - a[k], prompts) for k in a}
    out["content_error"] = clustered(mw.content_error(after, before), prompts)
    return {"rows": len(rows), "of": len(everything), **out}


def differences(images, base_images, base_metrics, prompts, scores) -> dict[str, list[float]]:
    """Per held-out image: metric(images) - metric(base), and the content error to the base."""
    got = mw.metrics(images, prompts, scores)
    out = {k: (got[k] - base_metrics[k]).tolist() for k in got}
    out["content_error"] = mw.content_error(images, base_images).tolist()
    return out


def summarise(per_seed: dict, prompts, shift: dict) -> dict:
    """Per seed: mean and clustered interval of each per-image difference; across seeds: the mean of
    the per-seed means, their SD, and the interval of the per-image differences averaged over seeds."""
    out = {"per_seed": {}, "pooled": {}}
    for seed, record in per_seed.items():
        figures = {m: clustered(v, prompts, reference=shift.get(m)) for m, v in record["differences"].items()}
        out["per_seed"][seed] = {**figures, "train_seconds": record["train_seconds"], "lora": record["lora"]}
    for m in next(iter(per_seed.values()))["differences"]:
        means = [out["per_seed"][s][m]["mean"] for s in per_seed]
        averaged = np.mean([per_seed[s]["differences"][m] for s in per_seed], axis=0)
        spread = statistics.stdev(means) if len(means) > 1 else None
        pooled = clustered(averaged, prompts, reference=shift.get(m))
        out["pooled"][m] = {**pooled, "seed_means": means, "seed_sd": spread}
    out["train_seconds"] = statistics.mean(r["train_seconds"] for r in per_seed.values())
    costs = [r["worker_seconds_per_pair"] for r in per_seed.values() if "worker_seconds_per_pair" in r]
    out["worker_seconds_per_pair"] = statistics.mean(costs) if costs else None
    return out


def prepare(name: str, pairs: str, context) -> dict:
    """The enhancement's null pair folder and its reference figures."""
    cfg, prod, args, held, base, scores = context
    prompts = held[0]
    null = os.path.join(args.work, name, "pairs-null")
    if not storage.is_complete(null):
        mw.write_pairs(null, mw.null_rows(mw.read_rows(pairs)), f"method_check (null of {name})")
    effect = pair_effect(pairs, scores)
    reference, shift = effect, {}
    if name == "photometric":  # the enhancement applied to the held-out base images themselves
        target = mw.photometric(base["images"])
        applied = differences(target, base["images"], base["metrics"], prompts, scores)
        shift = {k: applied[k] for k in ("brightness", "warmth")}
        reference = {k: clustered(v, prompts, reference=shift.get(k)) for k, v in applied.items()}
    record = {"pairs": effect["rows"], "pairs_effect": effect, "reference": reference, "variants": {}}
    return {"folders": {False: pairs, True: null}, "shift": shift, "record": record}


def train_and_measure(name: str, variant: str, seed: int, folders: dict, context) -> dict:
    cfg, prod, args, held, base, scores = context
    mode, on_null = VARIANTS[variant]
    tag = f"{mode}{'-null' if on_null else ''}{FOLDER_TAGS.get(variant, '')}"
    out = os.path.join(args.work, name, f"{tag}-seed{seed}")
    lora, seconds, summary = prod.train(folders[on_null], out, seed, mode, VARIANT_SETS.get(variant, ()))
    images = mw.sample_images(cfg, [lora], *held)
    got = differences(images, base["images"], base["metrics"], held[0], scores)
    means = {k: round(float(np.mean(v)), 4) for k, v in got.items()}
    log.info("%s / %s / seed %d: %s", name, variant, seed, means)
    # Cost: the training's own wall time (the worker group's or fit actors' start included) times the
    # workers it held, per pair trained on; the latent cache is shared by every variant and left out.
    per_pair = summary["seconds"] * cfg.train.num_workers / summary["cache"]["usable"]
    return {"lora": lora, "train_seconds": round(seconds, 1), "differences": got,
            "worker_seconds_per_pair": round(per_pair, 3)}  # fmt: skip


def run_all(prepared: dict, context, state: dict, state_path: str) -> dict:
    """Seed by seed (so a stopped check leaves whole seeds), every enhancement and variant; runs
    finished earlier in this work folder are taken from its state. Summaries of the seeds done."""
    args = context[2]
    for seed in [] if args.report_only else args.seeds:
        for name, prep in prepared.items():
            for variant in args.variants:
                runs = state.setdefault(name, {}).setdefault(variant, {})
                if str(seed) not in runs:
                    runs[str(seed)] = train_and_measure(name, variant, seed, prep["folders"], context)
                    mw.save_json(state_path, state)
    results = {}
    for name, prep in prepared.items():
        record = results[name] = prep["record"]
        for variant in args.variants:
            runs = state.get(name, {}).get(variant, {})
            done = {s: runs[str(s)] for s in args.seeds if str(s) in runs}
            if done:
                record["variants"][variant] = summarise(done, context[3][0], prep["shift"])
        runs = {v: {s: r for s, r in state.get(name, {}).get(v, {}).items() if int(s) in args.seeds}
                for v in args.variants}  # fmt: skip
        record["versus_control"] = method_report.versus_control(runs, context[3][0], prep["shift"])
    return results


def check_resume(state: dict, args) -> None:
    """A work folder resumes only the same check: results of other settings are never mixed in."""
    settings = {k: vars(args)[k] for k in ("preset", "sets", "critic", "train_prompts", "heldout_prompts")}
    if state.setdefault("settings", settings) != settings:
        raise SystemExit(
            f"{args.work} holds a check with other settings {state['settings']}; use another --work"
        )


def footer(args, cfg, jobs, held, load_start, seconds) -> str:
    load_end = os.getloadavg()
    return (
        f"preset {args.preset} {' '.join(args.sets)}; train.seed {args.seeds}; {len(jobs)} training images;"
        f" {len(held[0])} held-out images ({len(set(held[0]))} prompts); train: {cfg.train.steps} steps"
        f" per phase, rank {cfg.train.rank}, lr {cfg.train.learning_rate}, guidance {cfg.train.guidance};"
        f" load average {load_start[0]:.2f} -> {load_end[0]:.2f} on {os.cpu_count()} cores; {seconds:.0f} s"
    )


def shell(*command: str) -> str:
    return subprocess.run(command, capture_output=True, text=True, check=False).stdout.strip()


def uptime() -> str:
    return shell("uptime")


def main() -> None:
    args = parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    torch.set_num_threads(args.threads)
    started, load_start, uptime_start = time.perf_counter(), os.getloadavg(), uptime()
    cfg = load_config(args.preset, overrides=args.sets)
    jobs, held = fixed_prompts(args)
    os.makedirs(args.work, exist_ok=True)
    state_path = os.path.join(args.work, "state.json")
    state = mw.load_state(state_path)
    check_resume(state, args)
    ray_address = None if args.report_only else start_ray()
    prod = mw.Production(args.preset, args.sets, os.path.join(args.work, "logs"), ray_address)
    scores = mw.WorldScores(cfg)
    base_images = mw.sample_images(cfg, [], *held)
    base = {"images": base_images, "metrics": mw.metrics(base_images, held[0], scores)}
    # unpaired: what other seeds of the same prompts change, the scale that paired differences avoid
    other = mw.sample_images(cfg, [], held[0], [s + 500 for s in held[1]])
    unpaired = differences(other, base_images, base["metrics"], held[0], scores)
    context, prepared = (cfg, prod, args, held, base, scores), {}
    for name in args.enhancements:
        if name == "photometric":
            pairs = photometric_pairs(cfg, args.work, jobs)
        else:
            pairs = stage_pairs(prod, args, args.work, jobs)
        prepared[name] = prepare(name, pairs, context)
    results = run_all(prepared, context, state, state_path)
    text, seconds = method_report.table(results, COLUMNS), time.perf_counter() - started
    note = footer(args, cfg, jobs, held, load_start, seconds)
    print(f"{text}\n\nbase vs other seeds (unpaired): content error {np.mean(unpaired['content_error']):.2f}")
    print(note)
    record = {
        "args": vars(args), "results": results, "table": text, "footer": note,
        "unpaired_other_seeds": {k: clustered(v, held[0]) for k, v in unpaired.items()},
        "git": shell("git", "describe", "--always", "--dirty"), "platform": platform.platform(),
        "cpus": os.cpu_count(), "torch": torch.__version__,
        "uptime_start": uptime_start, "uptime_end": uptime(), "seconds": round(seconds),
        "load_start": load_start, "load_end": os.getloadavg(), "finished": time.strftime("%Y-%m-%d %H:%M:%S"),
    }  # fmt: skip
    path = os.path.join(args.out, f"method-check-{args.preset}{'-quick' if args.quick else ''}.json")
    mw.save_json(path, record)
    print(f"record: {path}")


if __name__ == "__main__":
    main()
