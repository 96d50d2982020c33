"""A cluster of several nodes on one machine (ray.cluster_utils.Cluster), driven like a real one.

Run by tests/test_cluster.py in its own process (a process joins one Ray, and the test session holds
another): `python tests/multinode_scenario.py WORKDIR` prints one JSON object with what it saw.

The nodes mirror clusters/aws.yaml: a CPU-only head, single-GPU workers labelled
artaug-node-type=gpu (generation, enhancement, training) and an 8-GPU worker labelled
artaug-node-type=critic. GPUs are logical: Ray hands actors a GPU id while torch sees no CUDA, so
the code must pick its device from torch, not from Ray's assignment.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
import threading
import time

import pyarrow.parquet as pq
import ray
from ray.cluster_utils import Cluster

from artaug.cluster import SharedStorageError
from artaug.config import ModelConfig, load_config
from artaug.critic.vllm_backend import engine_placement
from artaug.models.synthesis import pick_device
from artaug.prompts import read_prompts
from artaug.stages.contract import read_stage
from artaug.stages.generate import generate

GPU_NODE = {"num_cpus": 2, "num_gpus": 1, "labels": {"artaug-node-type": "gpu"}}
CRITIC_NODE = {"num_cpus": 8, "num_gpus": 8, "labels": {"artaug-node-type": "critic"}}
GENERATOR = "ModelHost"


def config(**overrides):
    base = {
        "ray.address": "auto",
        "generate.num_actors": 2,
        "generate.resources.gpus": 1,  # a logical GPU each: the request Ray schedules by
        "generate.resources.node_labels": "artaug-node-type=gpu",
        "generate.batch_size": 1,
        "model.device": "auto",  # what the code computes on: torch decides (CPU here)
    }
    return load_config("tiny", overrides=[f"{k}={v}" for k, v in (base | overrides).items()])


def written_rows(stage_dir: str) -> int:
    """Rows in the Parquet files a stage has finished writing so far."""
    total = 0
    for name in os.listdir(stage_dir) if os.path.isdir(stage_dir) else []:
        if name.endswith(".parquet"):
            try:
                total += pq.read_metadata(os.path.join(stage_dir, name)).num_rows
            except Exception:  # noqa: BLE001 - a file still being written
                pass
    return total


def generators(since_ms: float = 0) -> list[dict]:
    """Generation actors started since `since_ms` (epoch ms), alive or dead, from the GCS actor table
    (needs no dashboard)."""
    from ray._private import state

    return [
        info
        for info in state.actors().values()
        if GENERATOR in info["ActorClassName"] and info["Address"]["NodeID"] and info["StartTime"] >= since_ms
    ]


def generator_nodes(since_ms: float = 0) -> set[str]:
    return {info["Address"]["NodeID"] for info in generators(since_ms)}


@ray.remote
def device_probe() -> dict:
    return {
        "ray_gpu_ids": [str(i) for i in ray.get_gpu_ids()],
        "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
        "device": str(pick_device(ModelConfig(device="auto"))),
        "node": ray.get_runtime_context().get_node_id(),
    }


def main(workdir: str) -> dict:
    report: dict = {}
    # Short: Ray's Unix socket paths live under it and are limited to 107 bytes.
    temp_dir = tempfile.mkdtemp(prefix="artaug-mn-", dir="/tmp")
    start = time.perf_counter()
    cluster = Cluster(
        initialize_head=True,
        head_node_args={"num_cpus": 2, "num_gpus": 0, "temp_dir": temp_dir, "include_dashboard": False},
    )
    gpu_a = cluster.add_node(**GPU_NODE)
    gpu_b = cluster.add_node(**GPU_NODE)
    critic = cluster.add_node(**CRITIC_NODE)
    cluster.wait_for_nodes()
    os.environ["RAY_ADDRESS"] = cluster.address
    ray.init(address=cluster.address)
    report["startup_s"] = round(time.perf_counter() - start, 1)
    node_type = {
        gpu_a.node_id: "gpu",
        gpu_b.node_id: "gpu",
        critic.node_id: "critic",
        cluster.head_node.node_id: "head",
    }
    prompts_path = os.path.join(workdir, "prompts.txt")
    with open(prompts_path, "w") as f:
        f.write("\n".join(f"a lighthouse number {i}" for i in range(8)) + "\n")
    prompts = read_prompts(prompts_path)

    # 1. A node-local output on a cluster of several nodes is refused before any work starts.
    try:
        generate(config(), prompts, os.path.join(workdir, "refused", "generate"))
        report["refused"] = None
    except SharedStorageError as err:
        report["refused"] = str(err)
    report["refused_dir_exists"] = os.path.exists(os.path.join(workdir, "refused"))

    # 2. Placement: generation actors land on the gpu-labelled nodes only, compute on the CPU.
    shared = {"ray.shared_filesystem": "true"}  # every "node" here sees this machine's disk
    summary = generate(config(**shared), read_prompts(prompts_path), os.path.join(workdir, "placed"))
    report["placed"] = {
        "summary": {k: summary[k] for k in ("rows", "images", "errors")},
        "node_types": sorted(node_type.get(n, "unknown") for n in generator_nodes()),
    }
    probe = ray.get(
        device_probe.options(num_gpus=1, label_selector={"artaug-node-type": "gpu"}, num_cpus=0).remote()
    )
    report["probe"] = probe | {"node_type": node_type.get(probe.pop("node"), "unknown")}

    # 3. The critic's engine placement (tensor_parallel_size 8) fits only the 8-GPU node.
    cfg72 = load_config("flux-dev").critique
    group = ray.util.placement_group(**engine_placement(cfg72, on_gpu=True))
    ray.get(group.ready(), timeout=60)
    table = ray.util.placement_group_table(group)
    bundle_nodes = table["bundles_to_node_id"].values()
    report["critic_bundles"] = sorted({node_type.get(n, "unknown") for n in bundle_nodes})
    report["critic_strategy"] = table["strategy"]
    ray.util.remove_placement_group(group)

    # 4. A gpu node is lost after some rows are written; the autoscaler's replacement joins.
    lost_dir = os.path.join(workdir, "node-loss", "generate")
    lost_prompts_path = os.path.join(workdir, "prompts-loss.txt")
    with open(lost_prompts_path, "w") as f:
        f.write("\n".join(f"a quiet harbour number {i}" for i in range(LOSS_ROWS)) + "\n")
    outcome: dict = {}

    def run() -> None:
        try:
            # 8 steps: rows slow enough that the node goes while it still has work, even on an idle machine.
            cfg = config(**shared, **{"generate.blocks": LOSS_ROWS // 2, "generate.steps": 8})
            outcome["summary"] = generate(cfg, read_prompts(lost_prompts_path), lost_dir)
        except BaseException as err:  # noqa: BLE001 - reported to the test
            outcome["error"] = repr(err)

    loss_start_ms = time.time() * 1000
    worker = threading.Thread(target=run, daemon=True)
    worker.start()
    gpu_nodes = {gpu_a.node_id: gpu_a, gpu_b.node_id: gpu_b}

    def working_nodes() -> list[str]:
        """gpu nodes where this stage's actors are alive now (earlier stages' actors may linger)."""
        alive = generators(loss_start_ms)
        return [
            i["Address"]["NodeID"]
            for i in alive
            if i["State"] == "ALIVE" and i["Address"]["NodeID"] in gpu_nodes
        ]

    deadline = time.monotonic() + 240
    while worker.is_alive() and time.monotonic() < deadline:
        if written_rows(lost_dir) >= REMOVE_AFTER_ROWS and working_nodes():
            break
        time.sleep(0.2)
    report["rows_written_at_removal"] = written_rows(lost_dir)
    # The node to lose is one where an actor of the stage is working right now.
    victim = gpu_nodes[(working_nodes() or [gpu_b.node_id])[0]]
    names = {**node_type, victim.node_id: "lost"}
    report["actors_at_removal"] = sorted(names.get(n, "unknown") for n in working_nodes())
    cluster.remove_node(victim, allow_graceful=False)
    cluster.add_node(**GPU_NODE)  # added from the main thread, as Cluster requires
    worker.join(timeout=max(1.0, deadline - time.monotonic()))
    report["node_loss"] = {"finished": not worker.is_alive(), **outcome}
    if "summary" in outcome:
        ids = read_stage(lost_dir, columns=["prompt_id", "image"]).to_pydict()
        report["node_loss"]["ids"] = ids["prompt_id"]
        report["node_loss"]["with_image"] = sum(1 for image in ids["image"] if image)
    ray.shutdown()
    cluster.shutdown()
    shutil.rmtree(temp_dir, ignore_errors=True)
    return report


LOSS_ROWS = 40
REMOVE_AFTER_ROWS = 10

if __name__ == "__main__":
    print("SCENARIO " + json.dumps(main(sys.argv[1])), flush=True)
