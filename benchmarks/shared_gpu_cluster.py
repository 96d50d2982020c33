"""Warm hosts hand their GPUs to training: a 2-round `artaug run` on a simulated cluster shaped like
flux-dev's one GPU node group (docs/benchmarks.md, "Shared GPU node group: hosts hand their GPUs to
training"); with `--topology separate`, the alternative that keeps them: training on a node group of
its own.

    .venv/bin/python benchmarks/shared_gpu_cluster.py [--topology shared|separate] [--out DIR]
        [--work DIR] [--keep]

The cluster (ray.cluster_utils.Cluster, several raylets on this machine, as tests/multinode_scenario.py):
a CPU-only head and 2 worker nodes labelled artaug-node-type=gpu with 1 logical GPU each, the gpu
node group of clusters/aws.yaml in miniature. As in jobs/flux-dev.yaml, the synthesis hosts
(generate, enhance), the scorer hosts (filter) and the training workers all ask for a whole GPU on
that group: 2 synthesis hosts hold both GPUs, and 2 training workers need both. The critic is the
heuristic one (no model, no critic node). GPUs are logical: Ray assigns them, torch sees no CUDA and
computes on the CPU, so the figures are scheduling costs and model loads, not GPU speed.

The loop runs as a user would run it, `python -m artaug.cli run --preset tiny ... --set
ray.address=<the cluster>`, in its own process. A watchdog stops it when its manifest has not changed
for --stall-s seconds and records what was pending (a host or a worker waiting for a GPU). Afterwards
this process joins the cluster and runs round 2's generate twice on one set of hosts (same config,
prompts and model): the first call pays the hosts' start and model load, as round 2 does after the
release; the second is the warm-host generate a run whose hosts were kept would pay. Results:
OUT/shared-gpu-cluster.json (default benchmarks/results/).

`--topology separate`: 3 gpu nodes (2 synthesis hosts and 1 scorer host, a GPU each, so no pool
releases another) and 2 nodes labelled artaug-node-type=train for the 2 training workers, so the
hosts live for the run: the synthesis model loads once per host. Results: OUT/separate-gpu-groups.json.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import ray  # noqa: E402
from ray.cluster_utils import Cluster  # noqa: E402

HEAD = {"num_cpus": 2, "num_gpus": 0, "include_dashboard": False}
SYNTHESIS_HOSTS = TRAIN_WORKERS = 2
# Node groups per topology: label -> nodes (1 logical GPU and 3 CPUs each).
TOPOLOGIES = {"shared": {"gpu": 2}, "separate": {"gpu": 3, "train": 2}}
RESULTS = {"shared": "shared-gpu-cluster.json", "separate": "separate-gpu-groups.json"}
ROUND_STAGES = ("generate", "critique", "enhance", "filter", "train", "register")
COMMON_SETTINGS = [
    "ray.shared_filesystem=true",  # every "node" here sees this machine's disk
    "model.device=auto",  # compute where torch finds a device (the CPU: the GPUs are logical)
    "critique.backend=heuristic",
    "enhance.global_prompt=folded",  # as flux-dev: the heuristic critic's suggestions are global ones
    "loop.rounds=2", "loop.max_prompts=8", "loop.evaluate=false", "loop.report_pairs=2",
    # Every pair the critic changed trains (the filter's verdict is not what is measured here).
    "filter.delta=-1000", "filter.epsilon=1000", "filter.keep_unchanged=true",
    "loop.min_acceptance_rate=0", "loop.min_aesthetic_gain=-1000",
    f"generate.num_actors={SYNTHESIS_HOSTS}", "scorers.num_actors=1", f"train.num_workers={TRAIN_WORKERS}",
]  # fmt: skip


def gpu_node(label: str) -> dict:
    return {"num_cpus": 3, "num_gpus": 1, "labels": {"artaug-node-type": label}}


def settings(topology: str) -> list[str]:
    """flux-dev's placement (jobs/flux-dev.yaml): a whole GPU each, on the gpu node group; training on
    the train group when it has one."""
    groups = {"generate": "gpu", "scorers": "gpu", "train": "train" if topology == "separate" else "gpu"}
    return [*COMMON_SETTINGS, *(f"{section}.resources.{key}" for section, label in groups.items()
                                for key in ("gpus=1", f"node_labels=artaug-node-type={label}"))]  # fmt: skip


# ---------------------------------------------------------------------- the run


def run_loop(address: str, run_dir: str, log_path: str, timeout_s: float, stall_s: float,
             topology: str) -> dict:  # fmt: skip
    """`artaug run` against the cluster; stopped when it runs past timeout_s or stalls."""
    sets = [f"ray.address={address}", *settings(topology)]
    command = [sys.executable, "-m", "artaug.cli", "run", "--preset", "tiny", "--out", run_dir,
               *(a for s in sets for a in ("--set", s))]  # fmt: skip
    env = {**os.environ, "RAY_ADDRESS": address, "PYTHONUNBUFFERED": "1"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [ROOT, env.get("PYTHONPATH")]))
    manifest = os.path.join(run_dir, "manifest.json")
    start = time.monotonic()
    outcome: dict = {"command": " ".join(command[1:])}
    with open(log_path, "w") as log:
        process = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
        changed = time.monotonic()
        last = None
        try:
            while process.poll() is None:
                time.sleep(2)
                stamp = os.path.getmtime(manifest) if os.path.exists(manifest) else None
                if stamp != last:
                    last, changed = stamp, time.monotonic()
                stalled = time.monotonic() - changed > stall_s
                if stalled or time.monotonic() - start > timeout_s:
                    outcome["stopped"] = f"no manifest change for {stall_s:.0f} s" if stalled else "timeout"
                    outcome["pending"] = pending_work()
                    break
        finally:
            if process.poll() is None:
                process.terminate()
                try:
                    process.wait(timeout=60)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait()
    outcome.update(returncode=process.returncode, wall_s=round(time.monotonic() - start, 1))
    return outcome


def pending_work() -> dict:
    """What waits for resources now (actors not yet placed) and what the cluster has free."""
    from ray._private import state

    waiting = [
        f"{info['ActorClassName']} ({info['State']})"
        for info in state.actors().values()
        if info["State"] in ("PENDING_CREATION", "DEPENDENCIES_UNREADY", "RESTARTING")
    ]
    groups = [
        {"bundles": list(g["bundles"].values()), "strategy": g["strategy"]}
        for g in ray.util.placement_group_table().values()
        if g["state"] == "PENDING"
    ]
    return {"actors": waiting, "placement_groups": groups, "available": ray.available_resources()}


# ---------------------------------------------------------------------- what the run did


def stage_table(manifest: dict) -> dict:
    """Per round and stage: status, the stage's own seconds, and its wall seconds (manifest stamps)."""
    rounds = {}
    for k, stages in sorted(manifest.get("rounds", {}).items()):
        rows = {}
        for name in ROUND_STAGES:
            entry = stages.get(name, {})
            rows[name] = {"status": entry.get("status"), "seconds": entry.get("seconds"),
                          "wall_s": _wall(entry), "error": entry.get("error")}  # fmt: skip
            if name == "train":
                metrics = entry.get("metrics", {})
                rows[name].update({key: metrics.get(key) for key in ("steps", "busy_s", "busy_fraction")})
        statuses = {row["status"] for row in rows.values()}
        status = "complete" if statuses == {"complete"} else ",".join(sorted(map(str, statuses)))
        rounds[k] = {"status": status, "stages": rows}
    return rounds


def _wall(entry: dict) -> float | None:
    if not (entry.get("started") and entry.get("finished")):
        return None
    parse = lambda s: datetime.datetime.strptime(s, "%Y-%m-%dT%H:%M:%S%z")  # noqa: E731
    return (parse(entry["finished"]) - parse(entry["started"])).total_seconds()


def gpu_timeline(node_types: dict[str, str], since_ms: float) -> dict:
    """From the GCS actor table: where the hosts and the training workers ran, and whether any host
    was alive on a node while a training worker ran there (it would hold that node's one GPU)."""
    from ray._private import state

    def life(info) -> tuple[float, float]:
        end = info.get("EndTime") or time.time() * 1000
        return (info["StartTime"] - since_ms) / 1000, (end - since_ms) / 1000

    actors = [i for i in state.actors().values() if i["StartTime"] and i["StartTime"] >= since_ms]
    hosts = [i for i in actors if i["ActorClassName"].endswith("ModelHost")]
    workers = [i for i in actors if "TrainWorker" in i["ActorClassName"]]
    overlap = 0.0
    for h in hosts:
        for w in workers:
            if h["Address"]["NodeID"] == w["Address"]["NodeID"]:
                (a, b), (c, d) = life(h), life(w)
                overlap = max(overlap, min(b, d) - max(a, c))
    where = lambda group: sorted({node_types.get(i["Address"]["NodeID"], "unknown") for i in group})  # noqa: E731
    return {
        "host_actors": len(hosts),
        "host_node_types": where(hosts),
        "train_worker_actors": len(workers),
        "train_worker_node_types": where(workers),
        "max_host_worker_overlap_s": round(overlap, 3),
        "hosts": sorted([round(x, 1) for x in life(i)] for i in hosts),
        "train_workers": sorted([round(x, 1) for x in life(i)] for i in workers),
    }


def warm_reference(run_dir: str, work: str) -> dict:
    """Round 2's generate (its config, prompts and model) twice on one set of new hosts."""
    from artaug.config import load_config
    from artaug.layout import RunLayout
    from artaug.loop.prompt_sets import train_prompts
    from artaug.models.lineage import model_of_round
    from artaug.stages.generate import generate
    from artaug.stages.hosts import Hosts, hosts_summary

    cfg = load_config(path=RunLayout(run_dir).run_yaml)
    cfg = dataclasses.replace(cfg, model=model_of_round(cfg.model, [RunLayout(run_dir).round(1).train.lora]))
    prompts = train_prompts(cfg, 2)
    hosts = Hosts(cfg)
    try:
        calls = [generate(cfg, prompts, os.path.join(work, name), round_index=2, hosts=hosts)["seconds"]
                 for name in ("first-call", "warm-call")]  # fmt: skip
        loads = hosts_summary(hosts.stats())["synthesis"]["loads"]
    finally:
        hosts.close()
    return {"first_call_s": calls[0], "warm_call_s": calls[1], "synthesis_loads": loads}


def figures(manifest: dict, rounds: dict, reference: dict | None, topology: str) -> dict:
    synthesis = manifest.get("hosts", {}).get("synthesis", {})
    n_rounds = len(rounds)
    out = {
        "synthesis_hosts": SYNTHESIS_HOSTS,
        "synthesis_loads": sum(synthesis.get("loads", {}).values()),
        "synthesis_loads_release_and_reload": SYNTHESIS_HOSTS * n_rounds,  # hosts x (1 + reloads)
        # hosts x (generate, enhance) x rounds
        "synthesis_loads_if_a_pool_per_stage": SYNTHESIS_HOSTS * 2 * n_rounds,
    }
    generate = [rounds[k]["stages"]["generate"]["seconds"] for k in sorted(rounds)]
    train = [rounds[k]["stages"]["train"]["seconds"] for k in sorted(rounds)]
    out["generate_s"] = generate
    out["train_fit_s"] = train
    out["train_stage_wall_s"] = [rounds[k]["stages"]["train"]["wall_s"] for k in sorted(rounds)]
    if reference and len(generate) > 1 and generate[1]:
        warm = reference["warm_call_s"]
        out["round2_generate_s"] = generate[1]
        out["warm_generate_s"] = warm
        out["first_call_vs_warm"] = round(reference["first_call_s"] / warm, 2)
    if topology == "shared" and "round2_generate_s" in out:  # round 2 reloads: what that costs
        out["reload_cost_s"] = round(generate[1] - warm, 3)
        out["round2_vs_warm"] = round(generate[1] / warm, 2)
        if train[1]:
            out["reload_cost_vs_train_fit"] = round((generate[1] - warm) / train[1], 3)
    return out


# ---------------------------------------------------------------------- main


def start_cluster(temp_dir: str, attempts: int = 3) -> Cluster:
    """The head, retried: Ray gives a raylet 30 s to register, which a loaded 2-core machine can miss
    ("The current node timed out during startup"). A failed attempt's processes are ended by id."""
    import psutil

    for attempt in range(1, attempts + 1):
        before = {p.pid for p in psutil.Process().children(recursive=True)}
        try:
            return Cluster(initialize_head=True, head_node_args={**HEAD, "temp_dir": temp_dir})
        except Exception as err:  # noqa: BLE001 - Ray raises a bare Exception here
            if attempt == attempts:
                raise
            print(f"cluster start failed ({err}); retrying", flush=True)
            for child in psutil.Process().children(recursive=True):
                if child.pid not in before:
                    child.kill()
            time.sleep(30)
    raise AssertionError("unreachable")


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--topology",
        choices=sorted(TOPOLOGIES),
        default="shared",
        help="shared: training on the hosts' gpu group; separate: on a train group of its own",
    )
    parser.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results"), help="results folder")
    parser.add_argument("--work", default="", help="run directory's parent (default: a temporary folder)")
    parser.add_argument("--keep", action="store_true", help="keep the run directory")
    parser.add_argument("--timeout-s", type=float, default=2400)
    parser.add_argument("--stall-s", type=float, default=600, help="stop a run whose manifest stands still")
    args = parser.parse_args()
    # Stopped by SIGTERM or SIGINT (also when started in the background): the cluster is still shut down.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    signal.signal(signal.SIGINT, signal.default_int_handler)
    work = args.work or tempfile.mkdtemp(prefix="artaug-shared-gpu-")
    os.makedirs(work, exist_ok=True)
    run_dir, log_path = os.path.join(work, "run"), os.path.join(work, "run.log")
    os.environ.pop("RAY_ADDRESS", None)  # this process joins the cluster it starts, nothing else
    # Short: Ray's Unix socket paths live under it and are limited to 107 bytes.
    temp_dir = tempfile.mkdtemp(prefix="artaug-sg-", dir="/tmp")
    results: dict = {
        "date": datetime.date.today().isoformat(),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}, "
        f"ray {ray.__version__}",
        "topology": args.topology,
        "cluster": {
            "head": HEAD,
            "node_groups": {label: [gpu_node(label)] * n for label, n in TOPOLOGIES[args.topology].items()},
        },
        "settings": settings(args.topology),
    }
    cluster = None
    try:
        start = time.perf_counter()
        cluster = start_cluster(temp_dir)
        groups = TOPOLOGIES[args.topology].items()
        nodes = {cluster.add_node(**gpu_node(label)).node_id: label for label, n in groups for _ in range(n)}
        cluster.wait_for_nodes()
        ray.init(address=cluster.address)
        results["cluster_start_s"] = round(time.perf_counter() - start, 1)
        node_types = nodes | {cluster.head_node.node_id: "head"}
        since_ms = time.time() * 1000
        print(f"cluster {cluster.address}: {ray.cluster_resources()}; the run logs to {log_path}", flush=True)
        results["run"] = run_loop(cluster.address, run_dir, log_path, args.timeout_s, args.stall_s,
                                  args.topology)  # fmt: skip
        manifest_path = os.path.join(run_dir, "manifest.json")
        manifest = json.load(open(manifest_path)) if os.path.exists(manifest_path) else {}
        rounds = stage_table(manifest)
        results.update(status=manifest.get("status"), rounds=rounds, hosts=manifest.get("hosts"))
        results["gpu_timeline"] = gpu_timeline(node_types, since_ms)
        reference = None
        if manifest.get("status") == "finished" and len(rounds) == 2:
            reference = warm_reference(run_dir, os.path.join(work, "reference"))
            results["warm_reference"] = reference
        results["figures"] = figures(manifest, rounds, reference, args.topology)
        results["load_average_1_5_15_min_at_end"] = os.getloadavg()  # other work on the machine skews seconds
        with open(log_path) as f:
            results["run"]["log_tail"] = f.read()[-3000:] if results["run"]["returncode"] else ""
    finally:
        ray.shutdown()
        if cluster is not None:
            cluster.shutdown()
        shutil.rmtree(temp_dir, ignore_errors=True)
        if ok(results) and not args.keep and not args.work:  # a failed run's directory stays
            shutil.rmtree(work, ignore_errors=True)
        else:
            results["work"] = work
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, RESULTS[args.topology])
    with open(path, "w") as f:
        json.dump(results, f, indent=2)
    print(json.dumps(results, indent=2))
    print(f"written: {path}")
    return 0 if ok(results) else 1


def ok(results: dict) -> bool:
    rounds = results.get("rounds") or {}
    return results.get("status") == "finished" and all(r["status"] == "complete" for r in rounds.values())


if __name__ == "__main__":
    sys.exit(main())
