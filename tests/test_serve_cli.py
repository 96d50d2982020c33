"""`artaug serve`: what it serves, how it refuses bad input, the deploy manifests, and a real run.

Runs after tests/test_serve.py has shut its Serve instance down. The end-to-end tests start
`artaug serve` as its own process: one joined to the session's Ray and stopped with SIGINT, one on
its own private Ray and stopped with SIGTERM (as kill, systemd, Kubernetes and `ray job stop` do),
which runs beside the other tests (tests/own_ray.py).
"""

from __future__ import annotations

import base64
import io
import logging
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import requests
import yaml
from PIL import Image
from ray.serve.schema import ServeDeploySchema

from artaug.cli import main as cli
from artaug.config import ConfigError, load_config, to_yaml
from artaug.layout import RunLayout
from artaug.models.sampling import Job, sample
from artaug.models.synthesis import load_pipeline
from artaug.serve.app import app_builder
from artaug.serve.launch import resolve_config
from artaug.serve.sources import ServeSetupError
from tests.conftest import free_port, tiny_config
from tests.own_ray import still_running
from tests.test_models import make_lora

ROOT = Path(__file__).parents[1]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, tiny_dir) -> Path:
    """A finished run as `artaug run` leaves it: run.yaml and the combined LoRA."""
    path = tmp_path_factory.mktemp("run")
    (path / "run.yaml").write_text(to_yaml(tiny_config(**{"model.source": tiny_dir, "name": "demo"})))
    lora = make_lora(tmp_path_factory.mktemp("lora-src"), seed=2)
    combined = Path(RunLayout(str(path)).combined_lora)
    combined.parent.mkdir(parents=True)
    shutil.copy(lora, combined)
    return path


def test_a_run_directory_serves_its_combined_lora(run_dir, tiny_dir):
    cfg = resolve_config(run_dir=str(run_dir), overrides=["serve.port=9123"])
    assert cfg.name == "demo" and cfg.model.source == tiny_dir
    assert cfg.model.loras == [RunLayout(str(run_dir)).combined_lora]
    assert cfg.serve.port == 9123 and cfg.serve.host == "127.0.0.1"


def test_a_run_without_a_combined_lora_serves_the_base_model(tmp_path, tiny_dir, caplog):
    (tmp_path / "run.yaml").write_text(to_yaml(tiny_config(**{"model.source": tiny_dir})))
    with caplog.at_level(logging.WARNING):
        cfg = resolve_config(run_dir=str(tmp_path))
    assert cfg.model.loras == []
    assert "serving the base model" in caplog.text


def test_explicit_lora_and_base_model(tmp_path, tiny_dir):
    lora = make_lora(tmp_path, seed=3)
    cfg = resolve_config(lora=lora, overrides=[f"model.source={tiny_dir}"])
    assert cfg.model.loras == [lora]
    assert resolve_config().model.loras == []  # nothing given: the preset's base model


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"run_dir": "/nonexistent/run"}, "is not a run directory"),
        ({"lora": "/nonexistent/x.safetensors"}, "does not exist"),
        ({"run_dir": "r", "lora": "x.safetensors"}, "not both"),
        ({"run_dir": "r", "config_path": "c.yaml"}, "not both"),
    ],
)
def test_bad_sources_are_refused(kwargs, message):
    with pytest.raises(ServeSetupError, match=message):
        resolve_config(**kwargs)


def test_only_safetensors_are_loaded(tmp_path, capsys):
    pickled = tmp_path / "adapter.bin"
    pickled.write_bytes(b"not loaded")
    with pytest.raises(ServeSetupError, match="only safetensors"):
        resolve_config(lora=str(pickled))
    # The command line says so in one line, exit code 2, before Ray starts.
    assert cli(["serve", "--lora", str(pickled)]) == 2
    assert "only safetensors are loaded" in capsys.readouterr().err
    assert cli(["serve", "--set", "serve.max_ongoing_requests=2"]) == 2  # below max_batch_size
    assert "serve.max_ongoing_requests" in capsys.readouterr().err


APPLICATIONS = [("serve.yaml", "rayservice.yaml"), ("serve-enhance.yaml", "rayservice-enhance.yaml")]


@pytest.mark.parametrize("serve_file, _", APPLICATIONS)
def test_serve_config_passes_rays_own_schema(serve_file, _):
    config = ServeDeploySchema.model_validate(yaml.safe_load((ROOT / "jobs" / serve_file).read_text()))
    (app,) = config.applications
    module, _, name = app.import_path.partition(":")
    assert getattr(__import__(module, fromlist=[name]), name) is app_builder
    assert set(app.args) <= {"run_dir", "lora", "preset", "config", "set"}
    assert config.http_options.host == "127.0.0.1"
    settings = load_config("flux-dev", overrides=app.args["set"])  # every override is a real field
    assert settings.serve.resources.gpus == 1
    if settings.serve.enhance:  # a critic engine spans as many GPUs as a worker has
        assert settings.critique.backend == "vllm" and settings.critique.tensor_parallel_size == 1


@pytest.mark.parametrize("serve_file, service_file", APPLICATIONS)
def test_rayservice_runs_the_same_application(serve_file, service_file):
    service = yaml.safe_load((ROOT / "clusters" / service_file).read_text())
    assert service["apiVersion"] == "ray.io/v1" and service["kind"] == "RayService"
    serve_config = ServeDeploySchema.model_validate(yaml.safe_load(service["spec"]["serveConfigV2"]))
    deploy_config = ServeDeploySchema.model_validate(yaml.safe_load((ROOT / "jobs" / serve_file).read_text()))
    assert serve_config.applications == deploy_config.applications
    cluster = service["spec"]["rayClusterConfig"]
    assert cluster["rayVersion"] == "2.60.0"
    head = cluster["headGroupSpec"]["template"]["spec"]["containers"][0]
    assert 8000 in [port["containerPort"] for port in head["ports"]]
    (gpu_group,) = cluster["workerGroupSpecs"]
    worker = gpu_group["template"]["spec"]["containers"][0]
    assert worker["resources"]["limits"]["nvidia.com/gpu"] == "1"
    settings = load_config("flux-dev", overrides=deploy_config.applications[0].args["set"])
    gpus = settings.serve.max_replicas + settings.serve.enhance * settings.serve.critic_replicas
    assert gpu_group["maxReplicas"] >= gpus  # room for every replica of both deployments


def test_app_builder_rejects_unknown_args():
    with pytest.raises(ValueError, match="unknown application args"):
        app_builder({"run_dir": "r", "adapter_path": "/etc/passwd"})


def test_serving_the_interaction_needs_the_regional_mode():
    with pytest.raises(ConfigError, match="enhance.mode: regional"):
        app_builder({"set": ["serve.enhance=true", "enhance.mode=photometric"]})


def test_artaug_serve_answers_with_the_runs_fused_model_and_stops_cleanly(ray_local, run_dir):
    """`artaug serve RUN_DIR` as a separate process on the session's Ray, stopped by Ctrl-C."""
    port = free_port()
    address = ray_local.get_runtime_context().gcs_address
    server = subprocess.Popen(
        [sys.executable, "-m", "artaug.cli", "serve", str(run_dir), "--port", str(port)]
        + ["--set", f"ray.address={address}", "--set", "serve.app_name=cli-test"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        banner = server.stdout.readline()
        while banner and "serving" not in banner:
            banner = server.stdout.readline()
        assert f"http://127.0.0.1:{port}/v1/images/generations" in banner, banner
        answer = requests.post(
            f"http://127.0.0.1:{port}/v1/images/generations",
            json={"prompt": "a red kite over the sea", "seed": 5},
            timeout=120,
        )
        assert answer.status_code == 200, answer.text
        served = np.asarray(Image.open(io.BytesIO(base64.b64decode(answer.json()["data"][0]["b64_json"]))))
        server.send_signal(signal.SIGINT)
        output, _ = server.communicate(timeout=120)
    finally:
        if server.poll() is None:
            server.kill()
    assert server.returncode == 0, output
    assert "stopped" in output
    with pytest.raises(requests.ConnectionError):
        requests.get(f"http://127.0.0.1:{port}/healthz", timeout=10)
    left = [a for a in ray_local.util.list_named_actors(all_namespaces=True) if "SERVE" in a["name"]]
    assert not left, left

    cfg = resolve_config(run_dir=str(run_dir))
    (expected,) = sample(
        load_pipeline(cfg.model),
        [Job("a red kite over the sea", 5)],
        width=64,
        height=64,
        steps=cfg.generate.steps,
        guidance=cfg.generate.guidance,
        max_sequence_length=cfg.model.max_sequence_length,
    )
    np.testing.assert_array_equal(served[..., :3], np.asarray(expected.convert("RGB")))


@pytest.mark.heavy
def test_sigterm_stops_artaug_serve_and_its_ray_cleanly(stopped_server):
    """`artaug serve` (the default world model, on its own local Ray) stopped with SIGTERM, as kill, systemd,
    Kubernetes and `ray job stop` stop it: the same clean stop as Ctrl-C, and no Ray process left
    (tests/own_ray.py runs the server)."""
    server, output = stopped_server, stopped_server.output
    assert {"raylet", "gcs_server"} <= server.ray_side_names, server.ray_side_names
    assert server.returncode == 0, output[-4000:]
    assert "stopped" in output.splitlines(), output[-4000:]
    assert "SIGTERM received" not in output
    deadline = time.monotonic() + 5
    while still_running(server.ray_side) and time.monotonic() < deadline:
        time.sleep(0.2)
    left = still_running(server.ray_side)
    described = [f"{p.pid} {p.name()}" for p in left]
    for process in left:  # leave nothing behind, then fail
        process.kill()
    assert not left, described
