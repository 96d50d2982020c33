"""Scale (#20): prompt files read at flat memory, and the generate stage at flat memory and linear time.

    .venv/bin/python benchmarks/scale.py [--out DIR] [--sizes 10000 1000000 10000000]
                                         [--parquet-sizes 10000 1000000] [--images 256 4096]

Every measurement runs in a fresh process of its own (`--part`), so a peak is that measurement's:

1. Reading a run's prompts. Generated prompt files (.txt, and Parquet written with pyarrow's default
   row groups of 1 Mi rows) of each size; the process reads them as `artaug run` does with
   `loop.max_prompts: 4` (`loop.prompt_sets.check_prompts`, then round 1's `train_prompts`) and reports
   the growth of its peak RSS (VmHWM, /proc/self/status) across the read. Baseline in the same run:
   the file read whole and then cut to 4 (`read_prompts(path, 0).first(4)`, the reading of before).
2. A run's generate stage on those prompts (the 10k and 1M files): the process reads the first 4 as
   above and calls the generate stage on them as the loop does (hosts of its own, the tiny FLUX).
3. The generate stage over --images tiny prompts (64x64, 2 steps, batch 4, 2 hosts: the tiny preset's
   pools and blocks), and over 8 prompts as its start-up (pools, imports, model, the first batch).

In 2 and 3 a sampler thread polls every 0.25 s: the object store's bytes in use (the raylet's
`FormatGlobalMemoryInfo`, what `ray memory --stats-only` prints) and the summed proportional set size
(PSS) of the driver's whole process tree (Ray's raylet, GCS, workers and hosts; PSS shares shared
pages out, so the store's mapping is not counted once per process). The driver's own peak is its
VmHWM. Ray's start is outside every timer and before every baseline. JSON: OUT/scale.json (default
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
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(ROOT, "benchmarks", "results")
MB = 2**20
GOAL_READ_MB = 50
TINY = ["generate.width=64", "generate.height=64", "generate.steps=2", "generate.batch_size=4"]


def status_kb(field: str, pid: str = "self") -> int:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


def peak_mb() -> float:
    return status_kb("VmHWM") / 1024


def write_files(folder: str, sizes: list[int], parquet_sizes: list[int]) -> dict[str, str]:
    """{label: path}: `scene number i: <48 hex digits>` prompts, written a million at a time."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    def chunks(n):  # random hex after the number: text Parquet compresses little
        for start in range(0, n, 1_000_000):
            count = min(n, start + 1_000_000) - start
            blob = os.urandom(24 * count).hex()
            yield [f"scene number {start + k}: {blob[48 * k : 48 * k + 48]}" for k in range(count)]

    files = {}
    for n in sizes:
        files[f"txt {n}"] = path = os.path.join(folder, f"prompts-{n}.txt")
        with open(path, "w") as f:
            for lines in chunks(n):
                f.write("\n".join(lines) + "\n")
    for n in parquet_sizes:
        files[f"parquet {n}"] = path = os.path.join(folder, f"prompts-{n}.parquet")
        with pq.ParquetWriter(path, pa.schema([("prompt", pa.string())])) as writer:
            for lines in chunks(n):
                writer.write_table(pa.table({"prompt": lines}))  # pyarrow's default row groups (1 Mi rows)
    return files


def run_config(prompts: str, extra: list[str] = ()):
    from artaug.config import load_config

    return load_config("tiny", overrides=[f"prompts={prompts}", "loop.max_prompts=4", *TINY, *extra])


def part_read(path: str, whole: bool) -> dict:
    """A run's reading of its prompts (or the whole-file baseline), in this fresh process."""
    from artaug.loop.prompt_sets import check_prompts, train_prompts
    from artaug.prompts import read_prompts

    cfg = run_config(path)
    before, start = peak_mb(), time.perf_counter()
    if whole:
        prompts = read_prompts(path, 0, cfg.generate).first(4)
    else:
        check_prompts(cfg)
        prompts = train_prompts(cfg, 1)
    seconds = time.perf_counter() - start
    growth = round(peak_mb() - before, 1)
    return {"rows": len(prompts.rows), "seconds": round(seconds, 3), "peak_growth_mb": growth,
            "driver_peak_mb": round(peak_mb(), 1)}  # fmt: skip


class Sampler(threading.Thread):
    """Peaks of the object store's bytes in use and of the process tree's summed PSS."""

    def __init__(self):
        super().__init__(daemon=True)
        import psutil
        import ray
        import ray._private.internal_api as api

        self.psutil, self.api, self.stop = psutil, api, threading.Event()
        self.state = api.get_state_from_address(ray.get_runtime_context().gcs_address)  # ours, not others'

        self.store_peak = self.tree_peak = self.samples = 0
        self.reply = None

    def store(self):
        return self.api.get_memory_info_reply(self.state).store_stats

    def tree_pss(self) -> int:
        me = self.psutil.Process()
        total = 0
        for proc in (me, *me.children(recursive=True)):
            try:
                total += proc.memory_full_info().pss
            except (self.psutil.NoSuchProcess, self.psutil.AccessDenied):
                pass
        return total

    def run(self):
        while not self.stop.is_set():
            self.sample()
            self.stop.wait(0.25)

    def sample(self):
        stats = self.store()
        self.store_peak = max(self.store_peak, stats.object_store_bytes_used)
        self.tree_peak = max(self.tree_peak, self.tree_pss())
        self.samples += 1
        self.reply = stats

    def result(self) -> dict:
        self.stop.set()
        self.join()
        self.sample()
        return {"object_store_peak_mb": round(self.store_peak / MB, 2),
                "object_store_created_mb": round(self.reply.cumulative_created_bytes / MB, 2),
                "object_store_spilled_mb": round(self.reply.spilled_bytes_total / MB, 2),
                "tree_pss_peak_mb": round(self.tree_peak / MB, 1), "samples": self.samples}  # fmt: skip


def part_generate(prompts_file: str, images: int, out: str, sets: list[str] = ()) -> dict:
    """The generate stage in this fresh process: on a run's first 4 prompts of `prompts_file`, or on
    `images` generated prompts; Ray started first, outside the timer and the baselines."""
    from artaug.cluster import init_ray
    from artaug.prompts import PromptSet

    cfg = run_config(prompts_file or "unused.txt", sets)
    if prompts_file:
        from artaug.loop.prompt_sets import check_prompts, train_prompts

        check_prompts(cfg)
        prompts = train_prompts(cfg, 1)
    else:
        rows = [{"prompt_id": f"p{i:06d}", "prompt": f"scene number {i}: a lighthouse at dusk", "index": i}
                for i in range(images)]  # fmt: skip
        prompts = PromptSet(rows=rows, source="generated")
    init_ray(cfg.ray)
    from artaug.stages.generate import generate

    sampler = Sampler()
    sampler.sample()
    baseline = {"driver_peak_mb": round(peak_mb(), 1), "object_store_mb": round(sampler.store_peak / MB, 2),
                "tree_pss_mb": round(sampler.tree_peak / MB, 1)}  # fmt: skip
    sampler.start()
    start = time.perf_counter()
    summary = generate(cfg, prompts, os.path.join(out, "generate"))
    seconds = time.perf_counter() - start
    return {"prompts": len(prompts.rows), "seconds": round(seconds, 3), "rows_written": summary["rows"],
            "errors": summary["errors"], "parts": sum(1 for n in os.listdir(os.path.join(out, "generate"))
                                                      if n.endswith(".parquet")),
            "driver_peak_mb": round(peak_mb(), 1), "before": baseline, **sampler.result()}  # fmt: skip


def part(args) -> dict:
    if args.part == "read":
        return part_read(args.file, args.whole)
    return part_generate(args.file, args.images[0], args.work, args.sets)


def measure(argv: list[str], work: str) -> dict:
    """One measurement in a fresh process (flock'd by the caller's command, not here)."""
    command = [sys.executable, os.path.abspath(__file__), "--work", work, *argv]
    env = {**os.environ, "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    done = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, env=env)
    if done.returncode != 0:
        sys.exit(f"{' '.join(argv)} failed ({done.returncode}):\n{(done.stdout + done.stderr)[-4000:]}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    result["loadavg"] = open("/proc/loadavg").read().split()[:3]
    print(f"  {' '.join(argv)}: {json.dumps(result)}", flush=True)
    return result


def ratio(a: float, b: float) -> float | None:
    return round(a / b, 3) if b else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=RESULTS)
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 1_000_000, 10_000_000])
    parser.add_argument("--parquet-sizes", type=int, nargs="+", default=[10_000, 1_000_000, 10_000_000])
    parser.add_argument("--baseline-sizes", type=int, nargs="+", default=[10_000, 1_000_000],
                        help="sizes also read whole (the reading of before)")  # fmt: skip
    parser.add_argument("--images", type=int, nargs="+", default=[256, 4096])
    parser.add_argument("--startup-images", type=int, default=8)
    parser.add_argument("--skip", nargs="*", default=[], choices=["read", "run", "generate"])
    parser.add_argument("--part", choices=["read", "generate"], help=argparse.SUPPRESS)
    parser.add_argument("--set", dest="sets", action="append", default=[], metavar="SECTION.FIELD=VALUE",
                        help="settings of the generate stage runs (generate.block_rows=...)")  # fmt: skip
    parser.add_argument("--file", default="", help=argparse.SUPPRESS)
    parser.add_argument("--whole", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--work", default="", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.part:
        print(json.dumps(part(args)))
        return
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT)
    results = {
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}",
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "commit": commit.stdout.strip(),
        "loadavg_at_start": open("/proc/loadavg").read().split()[:3],
        "sets": args.sets,
        "goal": f"reading: peak growth under {GOAL_READ_MB} MB from 10k to 1M and 10M prompts;"
        " generate: memory flat and time linear from 256 to 4096 prompts",
    }
    with tempfile.TemporaryDirectory(prefix="artaug-scale-") as tmp:
        start = time.perf_counter()
        files = write_files(tmp, args.sizes, args.parquet_sizes)
        print(f"files written in {time.perf_counter() - start:.1f} s", flush=True)
        if "read" not in args.skip:
            reads = results["read_first_4"] = {}
            for label, path in files.items():
                reads[label] = {"file_mb": round(os.path.getsize(path) / MB, 1),
                                "streamed": measure(["--part", "read", "--file", path], tmp)}  # fmt: skip
                if int(label.split()[1]) in args.baseline_sizes:
                    reads[label]["whole"] = measure(["--part", "read", "--file", path, "--whole"], tmp)
        if "run" not in args.skip:
            runs = results["run_generate_first_4"] = {}
            for label in ("txt 10000", "txt 1000000"):
                if label in files:
                    work = tempfile.mkdtemp(dir=tmp)
                    runs[label] = measure(["--part", "generate", "--file", files[label]], work)
    if "generate" not in args.skip:
        stage = results["generate_stage"] = {}
        for n in (args.startup_images, *args.images):
            with tempfile.TemporaryDirectory(prefix="artaug-scale-gen-") as work:
                sets = [arg for item in args.sets for arg in ("--set", item)]
                stage[str(n)] = measure(["--part", "generate", "--images", str(n), *sets], work)
        summarize_stage(results, args.startup_images, args.images)
    results["loadavg_at_end"] = open("/proc/loadavg").read().split()[:3]
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "scale.json"), "w") as f:
        json.dump(results, f, indent=2)
    print(json.dumps(results, indent=2))


def summarize_stage(results: dict, startup: int, images: list[int]) -> None:
    """Time against size: raw, and with the start-up run's time taken off both."""
    stage = results["generate_stage"]
    small, large = stage[str(images[0])], stage[str(images[-1])]
    base = stage[str(startup)]["seconds"]
    results["generate_linearity"] = {
        "prompts_ratio": ratio(images[-1], images[0]),
        "time_ratio_raw": ratio(large["seconds"], small["seconds"]),
        "time_ratio_minus_startup": ratio(large["seconds"] - base, small["seconds"] - base),
        "prompts_ratio_minus_startup": ratio(images[-1] - startup, images[0] - startup),
        "driver_peak_ratio": ratio(large["driver_peak_mb"], small["driver_peak_mb"]),
        "object_store_peak_ratio": ratio(large["object_store_peak_mb"], small["object_store_peak_mb"]),
    }


if __name__ == "__main__":
    main()
