"""Serving cost: HTTP latency against the in-process fused pipeline, and what batching buys.

    python benchmarks/serve_latency.py
    python benchmarks/serve_latency.py --requests 200 --size 64 --steps 4 --clients 8
    (writes benchmarks/results/serve-latency.json; --out '' to skip)

One run measures, on the tiny FLUX (a fused LoRA leaves the same layers, so it costs the same), with
two applications deployed side by side: batching on (serve.max_batch_size = clients) and off (1).
  1. latency of one image, sequential requests: POST /v1/images/generations through Ray Serve's
     HTTP proxy, ingress and model replica, against calling the same pipeline in this process (one
     image, PNG and base64 encoded, as the replica does). Goal: HTTP p50 <= 1.2 x in-process p50
     + 15 ms. A lone request on the batching app also waits serve.batch_wait_timeout_s for company.
  2. throughput with `--clients` concurrent clients, batching on against off, images/s over HTTP.
     Goal: on / off >= 1.5.
The sides alternate in rounds and run at the same CPU priority as Ray's workers, so a busy shared
machine disturbs them alike. Every side uses one torch thread; Ray and Serve start-up are reported
apart; each side is warmed first. Recorded with the figures: the machine, the load average and the
CPU seconds this benchmark and the rest of the machine used in each measured phase.
"""

from __future__ import annotations

import argparse
import base64
import datetime
import io
import json
import os
import socket
import time
from concurrent.futures import ThreadPoolExecutor

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import psutil  # noqa: E402
import requests  # noqa: E402
import torch  # noqa: E402
from machine_facts import machine  # noqa: E402  (benchmarks/, beside this script)

from artaug.config import RunConfig  # noqa: E402
from artaug.models.synthesis import load_pipeline  # noqa: E402
from artaug.serve.launch import resolve_config  # noqa: E402

RAY_WORKER_NICENESS = 15  # Ray's default worker_niceness
RESULT = os.path.join(os.path.dirname(__file__), "results", "serve-latency.json")


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def summary_ms(seconds: list[float]) -> dict:
    ms = [s * 1000 for s in seconds]
    return {"p50_ms": round(percentile(ms, 0.5), 2), "p95_ms": round(percentile(ms, 0.95), 2)}


class InProcess:
    """The baseline: the same pipeline called here, one image per call, encoded as the replica does."""

    def __init__(self, cfg: RunConfig):
        torch.set_num_threads(cfg.serve.resources.torch_threads)
        self.cfg = cfg
        self.pipe = load_pipeline(cfg.model)

    def __call__(self, i: int) -> None:
        g = self.cfg.generate
        with torch.inference_mode():
            (image,) = self.pipe(
                prompt=[f"a lighthouse at dusk, {i}"],
                width=g.width,
                height=g.height,
                num_inference_steps=g.steps,
                guidance_scale=g.guidance,
                generator=[torch.Generator("cpu").manual_seed(i)],
                max_sequence_length=self.cfg.model.max_sequence_length,
                output_type="pil",
            ).images
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        base64.b64encode(buffer.getvalue())


class OverHttp:
    def __init__(self, url: str):
        self.url, self.session = url, requests.Session()

    def __call__(self, i: int) -> None:
        answer = self.session.post(
            self.url, json={"prompt": f"a lighthouse at dusk, {i}", "seed": i}, timeout=120
        )
        answer.raise_for_status()
        base64.b64decode(answer.json()["data"][0]["b64_json"])


def timed(call, first: int, count: int) -> list[float]:
    times = []
    for i in range(first, first + count):
        start = time.perf_counter()
        call(i)
        times.append(time.perf_counter() - start)
    return times


def burst(url: str, clients: int, per_client: int) -> float:
    """Seconds for `clients` threads to send `per_client` requests each, back to back."""

    def client(index: int) -> None:
        session = requests.Session()
        for i in range(per_client):
            body = {"prompt": f"a harbour, client {index}, {i}", "seed": index * 1000 + i}
            session.post(url, json=body, timeout=300).raise_for_status()

    start = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        list(pool.map(client, range(clients)))
    return time.perf_counter() - start


def snapshot() -> dict:
    """Load average, the machine's busy CPU seconds, and this process tree's (Serve's replicas and
    proxy live through every measured phase, so two snapshots bound a phase)."""
    t, tree = psutil.cpu_times(), 0.0
    me = psutil.Process()
    for p in [me, *me.children(recursive=True)]:
        try:
            c = p.cpu_times()
            tree += c.user + c.system
        except psutil.Error:
            pass
    busy = t.user + t.nice + t.system + t.irq + t.softirq
    return {"load": os.getloadavg(), "busy": busy, "tree": tree, "at": time.perf_counter()}


def phase(a: dict, b: dict) -> dict:
    mine = b["tree"] - a["tree"]
    return {
        "wall_s": round(b["at"] - a["at"], 1),
        "load_avg_before": [round(x, 2) for x in a["load"]],
        "load_avg_after": [round(x, 2) for x in b["load"]],
        "cpu_s_this_benchmark": round(mine, 1),
        # The load average lags by a minute and counts this benchmark too; this does not.
        "cpu_s_rest_of_machine": round(max(0.0, b["busy"] - a["busy"] - mine), 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=200, help="sequential requests per latency side")
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--per-client", type=int, default=10, help="requests per client and round")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds per measurement")
    parser.add_argument("--out", default=RESULT, help="also write the results as JSON here")
    args = parser.parse_args()
    # Ray starts its workers (proxy, replicas) at niceness 15: run this process, the baseline and
    # the clients, at the same priority so that other load on a shared machine weighs on all alike.
    os.nice(RAY_WORKER_NICENESS - os.nice(0))

    from ray import serve

    from artaug.cluster import init_ray
    from artaug.serve.app import build_app

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    base = [
        f"generate.width={args.size}",
        f"generate.height={args.size}",
        f"generate.steps={args.steps}",
        f"serve.max_ongoing_requests={2 * args.clients}",
    ]
    configs = {
        "batched": resolve_config(overrides=[*base, f"serve.max_batch_size={args.clients}"]),
        "single": resolve_config(overrides=[*base, "serve.max_batch_size=1"]),
    }
    results = {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "machine": machine(("torch", "diffusers", "ray", "requests")),
        "work": f"1 image {args.size}x{args.size}, {args.steps} steps, tiny FLUX, PNG + base64",
        "load_avg_at_start": [round(x, 2) for x in os.getloadavg()],
    }
    start = time.perf_counter()
    init_ray(configs["batched"].ray)
    ray_s = time.perf_counter() - start
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    try:
        # Both applications side by side, so every measurement below can alternate between them
        # (and the in-process baseline) and a shared, busy machine disturbs all sides alike.
        for name, cfg in configs.items():
            serve.run(build_app(cfg), name=name, route_prefix=f"/{name}")
        results["startup_s"] = {
            "ray": round(ray_s, 1),
            "serve_2_apps": round(time.perf_counter() - start - ray_s, 1),
        }
        urls = {name: f"http://127.0.0.1:{port}/{name}/v1/images/generations" for name in configs}
        sides = {"in_process": InProcess(configs["single"]), **{n: OverHttp(u) for n, u in urls.items()}}
        latency = {name: [] for name in sides}
        chunk = max(1, args.requests // args.rounds)
        for call in sides.values():
            timed(call, 0, 10)  # warm-up
        marks = [snapshot()]
        for r in range(args.rounds):
            for name, call in sides.items():
                latency[name] += timed(call, 1000 + r * chunk, chunk)
        seconds = {name: 0.0 for name in configs}
        marks.append(snapshot())
        for name in configs:
            burst(urls[name], args.clients, 2)  # warm-up
        marks.append(snapshot())
        for _ in range(args.rounds):
            for name in configs:
                seconds[name] += burst(urls[name], args.clients, args.per_client)
        marks.append(snapshot())
        calls = {
            n: serve.get_deployment_handle("FluxModel", n).stats.remote().result()["call_sizes"]
            for n in configs
        }
    finally:
        serve.shutdown()
    results["threads"] = {
        "in_process": torch.get_num_threads(),  # read back here, where the baseline ran
        "model_replicas": configs["single"].serve.resources.torch_threads,  # configured
        "niceness": os.nice(0),
    }
    results["cpu"] = {"latency_phase": phase(*marks[0:2]), "throughput_phase": phase(*marks[2:4])}
    plain = summary_ms(latency["in_process"])
    results["latency"] = {"in_process": plain}
    for name in configs:
        http = summary_ms(latency[name])
        results["latency"][f"http_{name}"] = {
            **http,
            "p50_ratio": round(http["p50_ms"] / plain["p50_ms"], 3),
            "p50_overhead_ms": round(http["p50_ms"] - plain["p50_ms"], 2),
        }
    results["latency"]["p50_goal_ms"] = round(1.2 * plain["p50_ms"] + 15, 2)
    images = args.rounds * args.clients * args.per_client
    rate = {name: images / seconds[name] for name in configs}
    results["throughput"] = {
        "clients": args.clients,
        "batching_on_images_per_s": round(rate["batched"], 3),
        "batching_off_images_per_s": round(rate["single"], 3),
        "ratio": round(rate["batched"] / rate["single"], 3),
        "pipeline_calls_by_size": calls,
    }
    print(json.dumps(results, indent=2))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
