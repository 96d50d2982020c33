"""Running beyond one machine: cluster configs, shared storage, weights, secrets, several nodes.

The launcher YAMLs are validated against the JSON schema inside the installed ray package; the
several-node behaviour runs on ray.cluster_utils.Cluster in a subprocess (tests/multinode_scenario.py),
because this test session is already connected to its own local Ray; it runs beside the other tests
(tests/own_ray.py).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
import tomllib
from pathlib import Path

import jsonschema
import pytest
import ray
import yaml

from artaug import cli
from artaug.cluster import SharedStorageError, _job_env_vars, check_output_storage, label_selector
from artaug.config import ConfigError, RayConfig, load_config
from artaug.critic.vllm_backend import engine_placement
from artaug.hub import Fetch, HubError, check_reachable, models_of
from tests.conftest import tiny_config

REPO = Path(__file__).resolve().parents[1]
NODE_TYPES = {"head", "gpu", "critic"}


def launcher_schema() -> dict:
    return json.loads((Path(ray.__file__).parent / "autoscaler" / "ray-schema.json").read_text())


# ---------------------------------------------------------------- cluster configs and image


@pytest.mark.parametrize("name", ["aws.yaml", "gcp.yaml"])
def test_launcher_configs_follow_rays_schema_and_our_node_types(name):
    config = yaml.safe_load((REPO / "clusters" / name).read_text())
    jsonschema.validate(config, launcher_schema())
    types = config["available_node_types"]
    assert set(types) == NODE_TYPES and config["head_node_type"] == "head"
    assert types["head"]["resources"] == {"CPU": 0}  # no stage work on the head
    assert types["gpu"]["resources"]["GPU"] == 1 and types["gpu"]["max_workers"] >= 1
    assert types["critic"]["resources"]["GPU"] == 8  # one tensor-parallel 72B engine
    assert all(types[t]["min_workers"] == 0 for t in ("gpu", "critic"))  # autoscaled from zero
    for node_type, spec in types.items():
        assert spec["labels"] == {"artaug-node-type": node_type}
    assert config["max_workers"] >= sum(types[t]["max_workers"] for t in ("gpu", "critic"))
    assert "artaug:gpu" in config["docker"]["image"]
    text = (REPO / "clusters" / name).read_text()
    assert not re.search(r"hf_[A-Za-z0-9]{20,}", text) and "HF_TOKEN=" not in text


def test_the_cluster_configs_labels_are_what_the_job_config_selects():
    cfg = load_config(path=str(REPO / "jobs" / "flux-dev.yaml"))
    for section in (cfg.generate, cfg.scorers, cfg.train, cfg.serve):
        assert label_selector(section.resources.node_labels) == {"artaug-node-type": "gpu"}
    assert cfg.critique.tensor_parallel_size == 8 and 0 < cfg.critique.gpu_memory_utilization <= 0.95
    assert cfg.generate.resources.gpus == 1 and cfg.train.resources.gpus == 1  # whole GPUs for FLUX
    assert cfg.hub.offline and cfg.hub.cache_dir and cfg.ray.address == "auto"


def test_rayjob_manifest_runs_the_loop_on_labelled_gpu_groups_with_the_token_from_a_secret():
    text = (REPO / "clusters" / "rayjob.yaml").read_text()
    job = yaml.safe_load(text)
    assert (job["apiVersion"], job["kind"]) == ("ray.io/v1", "RayJob")
    spec = job["spec"]
    assert spec["entrypoint"].startswith("python -m artaug.cli run --config ")
    assert spec["shutdownAfterJobFinishes"] is True
    cluster = spec["rayClusterSpec"]
    assert cluster["rayVersion"] == ray.__version__ and cluster["enableInTreeAutoscaling"] is True
    head = cluster["headGroupSpec"]
    assert head["rayStartParams"]["num-cpus"] == "0"
    groups = {g["groupName"]: g for g in cluster["workerGroupSpecs"]}
    assert set(groups) == {"gpu", "critic"}
    containers = [head["template"]["spec"]["containers"][0]]
    for name, gpus in (("gpu", "1"), ("critic", "8")):
        group = groups[name]
        assert group["rayStartParams"]["labels"] == f"artaug-node-type={name}"
        assert group["minReplicas"] == 0 and group["maxReplicas"] >= 1
        container = group["template"]["spec"]["containers"][0]
        assert container["resources"]["limits"]["nvidia.com/gpu"] == gpus
        containers.append(container)
    for container in containers:
        assert container["image"].endswith("artaug:gpu")
        env = {e["name"]: e for e in container["env"]}
        assert env["HF_TOKEN"]["valueFrom"]["secretKeyRef"]["name"] == "hf-token"
        assert "value" not in env["HF_TOKEN"]
        mounts = {m["mountPath"] for m in container["volumeMounts"]}
        assert env["HF_HUB_CACHE"]["value"].startswith("/mnt/shared") and "/mnt/shared" in mounts
    assert "runtimeEnvYAML" not in spec  # nothing secret or bulky travels through runtime_env


def test_the_image_is_rays_gpu_image_at_our_ray_version_with_the_gpu_group():
    pinned = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    version = next(d for d in pinned if d.startswith("ray[")).split("==")[1]
    dockerfile = (REPO / "docker" / "Dockerfile").read_text()
    assert f"FROM rayproject/ray:{version}-py311-gpu" in dockerfile
    assert 'pip install --no-cache-dir ".[gpu]"' in dockerfile
    assert "HF_TOKEN" not in dockerfile  # no secret baked into an image


@pytest.mark.parametrize(
    "name", ["aws.yaml", "gcp.yaml", "rayjob.yaml", "rayservice.yaml", "rayservice-enhance.yaml"]
)
def test_templates_share_nothing_world_writable_and_turn_on_rays_token_auth(name):
    text = (REPO / "clusters" / name).read_text()
    assert not re.search(r"chmod\s+(-R\s+)?[0-7]?7[0-7]7\b|chmod\s+\S*o\+w|a\+w", text)
    config = yaml.safe_load(text)
    if name in ("aws.yaml", "gcp.yaml"):  # every node starts Ray with token auth, the token mounted
        starts = config["head_start_ray_commands"] + config["worker_start_ray_commands"]
        assert all("RAY_AUTH_MODE=token ray start" in c for c in starts if "ray start" in c)
        assert config["file_mounts"]["~/.ray/auth_token"] == "~/.ray/auth_token"
        return
    spec = config["spec"].get("rayClusterSpec") or config["spec"]["rayClusterConfig"]
    groups = [spec["headGroupSpec"], *spec["workerGroupSpecs"]]
    for group in groups:  # every pod: token mode on, the token from a Secret (never a literal)
        env = {e["name"]: e for e in group["template"]["spec"]["containers"][0]["env"]}
        assert env["RAY_AUTH_MODE"]["value"] == "token"
        assert env["RAY_AUTH_TOKEN"]["valueFrom"]["secretKeyRef"]["name"] == "ray-auth-token"


def test_job_runtime_env_carries_no_secret():
    runtime_env = yaml.safe_load((REPO / "jobs" / "runtime_env.yaml").read_text())
    names = set(runtime_env.get("env_vars", {}))
    assert not {n for n in names if re.search(r"TOKEN\b|TOKEN_|SECRET|KEY|PASSWORD", n)}


# ---------------------------------------------------------------- shared storage


def test_node_local_output_is_refused_on_several_nodes_or_a_remote_ray():
    local = RayConfig()
    check_output_storage("/data/run", local, nodes=1)  # one node: anything goes
    check_output_storage("s3://bucket/run", local, nodes=3)
    check_output_storage("gs://bucket/run", local, nodes=3)
    with pytest.raises(SharedStorageError, match="3 nodes.*ray.shared_filesystem=true"):
        check_output_storage("/data/run", local, nodes=3)
    with pytest.raises(SharedStorageError):
        check_output_storage("file:///data/run", local, nodes=2)
    check_output_storage("/mnt/nfs/run", RayConfig(shared_filesystem=True), nodes=3)
    remote = RayConfig(address="ray://10.0.0.5:10001")
    with pytest.raises(SharedStorageError, match=r"Ray runs elsewhere \(ray://10.0.0.5:10001\)"):
        check_output_storage("runs/x", remote, nodes=1, remote=True)


def test_a_local_output_passes_on_this_one_node_ray(ray_local, tmp_path):
    from artaug.cluster import init_ray

    init_ray(RayConfig(), output=str(tmp_path / "out"))  # the session's Ray: one node


def test_joining_ray_sets_the_parquet_reader_that_starts_no_actors(ray_local):
    """Ray Data's V2 Parquet reader starts footer-reader actors on every read (docs/platform.md)."""
    from ray.data import DataContext

    from artaug.cluster import init_ray

    DataContext.get_current().use_datasource_v2 = True
    init_ray(RayConfig())  # Ray is up already: joining it still sets the reader
    assert DataContext.get_current().use_datasource_v2 is False


def test_shared_storage_error_is_one_line_before_ray_starts(tmp_path, prompt_file):
    # A remote address is known to be another machine before anything connects (its own process:
    # this session's Ray is already up, and an initialised Ray is what init_ray checks then).
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"} | {"PYTHONPATH": str(REPO)}
    done = subprocess.run(
        [sys.executable, "-m", "artaug.cli", "generate", "--prompts", prompt_file,
         "--out", str(tmp_path / "g"), "--set", "ray.address=ray://10.255.255.1:10001"],
        env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    errors = [line for line in done.stderr.splitlines() if line.startswith("artaug: error: ")]
    assert done.returncode == 2 and len(errors) == 1 and "Traceback" not in done.stderr
    assert "Ray runs elsewhere (ray://10.255.255.1:10001)" in errors[0]
    assert "ray.shared_filesystem=true" in done.stderr and not (tmp_path / "g" / "generate").exists()


def test_job_env_vars_are_not_set_twice(monkeypatch):
    monkeypatch.setenv(
        "RAY_JOB_CONFIG_JSON_ENV_VAR",
        json.dumps({"runtime_env": {"env_vars": {"TOKENIZERS_PARALLELISM": "false"}}, "metadata": {}}),
    )
    assert _job_env_vars() == {"TOKENIZERS_PARALLELISM"}
    monkeypatch.delenv("RAY_JOB_CONFIG_JSON_ENV_VAR")
    assert _job_env_vars() == set()


# ---------------------------------------------------------------- placement settings


def test_node_labels_are_checked_and_become_label_selectors():
    cfg = tiny_config(**{"generate.resources.node_labels": "artaug-node-type=gpu,zone=a"})
    assert label_selector(cfg.generate.resources.node_labels) == {"artaug-node-type": "gpu", "zone": "a"}
    assert label_selector([]) is None
    for bad in ("gpu", "a b=c", "k=-v", "=v"):
        with pytest.raises(ConfigError, match="train.resources.node_labels"):
            tiny_config(**{"train.resources.node_labels": bad})


def test_critic_engines_pack_their_tensor_parallel_ranks_on_one_node():
    critique = load_config("flux-dev").critique
    group = engine_placement(critique, on_gpu=True)
    assert group == {"bundles": [{"GPU": 1, "CPU": 1}] * 8, "strategy": "STRICT_PACK"}
    assert engine_placement(critique, on_gpu=False) == {"bundles": [{"CPU": 1}]}


# ---------------------------------------------------------------- weights


def test_prefetch_list_covers_every_hub_model_of_the_flux_dev_preset_once():
    fetches = {f.field: f for f in models_of(load_config("flux-dev"))}
    assert fetches["model.source"].repo == "black-forest-labs/FLUX.1-dev"
    assert fetches["model.source"].allow == ("model_index.json", "*/*")  # not the single-file copy
    assert fetches["critique.model"].repo == "Qwen/Qwen2.5-VL-72B-Instruct"
    assert fetches["evaluate.judge_model"].repo == "google/gemma-3-27b-it"
    assert "safety.model" not in fetches  # the same CLIP as scorers.clip: fetched once
    repos = [f.repo for f in fetches.values()]
    assert len(repos) == len(set(repos))
    assert models_of(load_config("tiny")) == []  # tiny models are built, never fetched


def test_prefetch_fails_fast_with_one_line_when_the_hub_is_unreachable(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # nothing listens on the discard port
    start = time.perf_counter()
    code = cli.main(["models", "prefetch", "--preset", "flux-dev", "--set", f"hub.cache_dir={tmp_path}",
                     "--set", "hub.connect_timeout_s=3"])  # fmt: skip
    seconds = time.perf_counter() - start
    err = capsys.readouterr().err
    assert code == 2 and seconds < 10
    assert err.startswith("artaug: error: cannot reach http://127.0.0.1:9 within 3 s")
    assert err.count("\n") == 1
    assert list(tmp_path.iterdir()) == []


def test_prefetch_reaches_nothing_here_and_refuses_offline_mode(monkeypatch):
    from artaug.hub import prefetch

    monkeypatch.delenv("HF_ENDPOINT", raising=False)
    with pytest.raises(HubError, match="cannot reach https://huggingface.co"):
        check_reachable(5)  # this machine has no route to the hub
    cfg = load_config("flux-dev", overrides=["hub.offline=true"])
    with pytest.raises(HubError, match="offline mode is on"):
        prefetch([Fetch("argument", "black-forest-labs/FLUX.1-dev")], cfg.hub)


def test_hub_settings_reach_the_driver_environment(monkeypatch, tmp_path):
    from huggingface_hub import constants

    from artaug.hub import apply

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    for name in ("HF_HUB_OFFLINE", "HF_HUB_CACHE"):  # apply sets huggingface_hub's copies too
        monkeypatch.setattr(constants, name, getattr(constants, name))
    apply(load_config("tiny", overrides=[f"hub.cache_dir={tmp_path}", "hub.offline=true"]).hub)
    assert os.environ["HF_HUB_CACHE"] == str(tmp_path) and os.environ["HF_HUB_OFFLINE"] == "1"


# ---------------------------------------------------------------- several nodes


@pytest.mark.heavy
def test_stages_on_a_simulated_multi_node_cluster(simulated_cluster):
    """Placement by node labels, logical GPUs vs the torch device, critic packing, and node loss."""
    returncode, output, seconds = simulated_cluster
    print(f"multi-node scenario: {seconds:.1f} s")
    lines = [line for line in output.splitlines() if line.startswith("SCENARIO ")]
    assert returncode == 0 and lines, output[-4000:]
    report = json.loads(lines[-1].removeprefix("SCENARIO "))

    # A node-local output is refused on 4 nodes, before anything is written.
    assert "the Ray cluster has 4 nodes" in report["refused"] and not report["refused_dir_exists"]
    # Generation actors asked for a logical GPU on gpu-labelled nodes: they ran on both gpu nodes,
    # never on the head or the 8-GPU critic node, and computed on the CPU (torch sees no CUDA).
    assert report["placed"]["summary"] == {"rows": 8, "images": 8, "errors": 0}
    assert report["placed"]["node_types"] == ["gpu", "gpu"]
    probe = report["probe"]
    assert probe["ray_gpu_ids"] == ["0"] and probe["cuda_visible_devices"] == "0"
    assert probe["device"] == "cpu" and probe["node_type"] == "gpu"
    # The 72B critic's 8 ranks: all on the critic node.
    assert report["critic_bundles"] == ["critic"] and report["critic_strategy"] == "STRICT_PACK"
    # A gpu node removed after 10 of 40 rows were written, while one of the stage's two actors ran
    # on it: every row once, none lost.
    loss = report["node_loss"]
    assert 10 <= report["rows_written_at_removal"] < 40
    assert loss["finished"] and "error" not in loss, loss.get("error")
    assert loss["ids"] == [f"p{i:06d}" for i in range(40)]
    assert loss["with_image"] == 40 and loss["summary"]["rows"] == 40
    assert "lost" in report["actors_at_removal"], report["actors_at_removal"]
