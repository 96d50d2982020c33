"""Hostile input to the image API and the serving setup: every refusal is an OpenAI-shaped error that
names the problem, and nothing reaches the model (its counters do not move).

One Serve application for the module (the tiny saved FLUX), with an API key, a small cost bound and
the hub settings set; a real HTTP client. The model replica's batching is also checked in-process.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import time
from argparse import Namespace

import pytest
import ray
import requests
from huggingface_hub import constants
from ray import serve

from artaug.loop.rundir import start
from artaug.serve.api import ImageJob
from artaug.serve.app import build_app
from artaug.serve.edge import MAX_BODY_BYTES, key_digest
from artaug.serve.launch import resolve_config
from artaug.serve.model import FluxModel, ImageFailed
from tests.conftest import free_port, tiny_config

APP = "artaug-hostile"
KEY_ENV = "ARTAUG_TEST_API_KEY"
KEY = "k3y-for-the-hostile-tests"
COST = 2 * 64 * 64 * 8  # n x width x height x steps


@pytest.fixture(scope="module")
def served(ray_local, tiny_dir, tmp_path_factory):
    """The app with a key, a cost bound and hub settings; yields (URL, model handle, hub cache dir)."""
    cache = str(tmp_path_factory.mktemp("hub-cache"))
    port = free_port()
    os.environ[KEY_ENV] = KEY
    saved = {name: getattr(constants, name) for name in ("HF_HUB_OFFLINE", "HF_HUB_CACHE")}
    saved_env = {name: os.environ.get(name) for name in ("HF_HUB_OFFLINE", "HF_HUB_CACHE")}
    cfg = resolve_config(
        overrides=[
            f"model.source={tiny_dir}",
            f"serve.port={port}",
            f"serve.app_name={APP}",
            f"serve.api_key_env={KEY_ENV}",
            f"serve.max_request_cost={COST}",
            "serve.max_steps=400",
            f"hub.cache_dir={cache}",
            "hub.offline=true",
        ]
    )
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(build_app(cfg), name=APP, route_prefix="/")
    yield f"http://127.0.0.1:{port}", serve.get_deployment_handle("FluxModel", app_name=APP), cache
    serve.shutdown()
    del os.environ[KEY_ENV]
    for name, value in saved.items():
        setattr(constants, name, value)
    for name, value in saved_env.items():
        os.environ.pop(name, None) if value is None else os.environ.__setitem__(name, value)


GEN = "/v1/images/generations"
AUTH = {"Authorization": f"Bearer {KEY}"}
JSON = {"Content-Type": "application/json", **AUTH}


def requests_seen(handle) -> int:
    return handle.stats.remote().result(timeout_s=30)["requests"]


def assert_openai_error(answer: requests.Response, status: int, words: str) -> dict:
    assert answer.status_code == status, answer.text
    error = answer.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}, error
    assert words in error["message"], error
    return error


def oversize_chunks():
    chunk = b"[" + b" " * (64 * 1024 - 1)
    for _ in range(MAX_BODY_BYTES // len(chunk) + 8):  # no Content-Length: sent chunked
        yield chunk


HOSTILE = [
    # (method, path, body, headers, status, words)
    ("post", GEN, oversize_chunks, JSON, 413, "the limit is 1048576"),
    ("post", GEN, b"", JSON, 400, "the body is empty"),
    ("post", GEN, b'{"prompt": "a \xff\xfe"}', JSON, 400, "not valid UTF-8"),
    ("post", GEN, b"[" * 10_000 + b"]" * 10_000, JSON, 400, "nested too deeply"),
    ("post", GEN, b'{"prompt": "a"}', {**AUTH, "Content-Type": "text/plain"}, 400, "application/json"),
    ("post", GEN, b'{"prompt": "a \\ud800 b"}', JSON, 400, "lone surrogate"),
    ("post", GEN, b'{"prompt": "a", "n": 2, "steps": 9}', JSON, 400, f"the limit is {COST:,}"),
    ("post", GEN, b'{"prompt": "a"}', {"Content-Type": "application/json"}, 401, "key is required"),
    ("post", GEN, b'{"prompt": "a"}', {**JSON, "Authorization": "Bearer wrong"}, 401, "key is required"),
    ("get", "/v1/models", None, {"Authorization": f"Basic {KEY}"}, 401, "API key is required"),
    ("get", GEN, None, AUTH, 405, "GET is not allowed"),
    ("post", "/v1/nothing", b"{}", JSON, 404, "no route POST /v1/nothing"),
    ("get", "/nothing", None, {}, 404, "no route GET /nothing"),
]


@pytest.mark.parametrize("method, path, body, headers, status, words", HOSTILE, ids=range(len(HOSTILE)))
def test_hostile_requests_get_an_openai_error_and_never_reach_the_model(
    served, method, path, body, headers, status, words
):
    url, handle, _ = served
    before = requests_seen(handle)
    data = body() if callable(body) else body
    answer = requests.request(method, f"{url}{path}", data=data, headers=headers, timeout=60)
    assert_openai_error(answer, status, words)
    assert requests_seen(handle) == before  # refused at the edge: the model did no work


def test_the_right_key_is_served_and_health_needs_none(served):
    url, handle, _ = served
    answer = requests.post(f"{url}/v1/images/generations", json={"prompt": "a", "steps": 2}, headers=AUTH,
                           timeout=60)  # fmt: skip
    assert answer.status_code == 200, answer.text
    assert requests.get(f"{url}/v1/models", headers=AUTH, timeout=60).status_code == 200
    assert requests.get(f"{url}/healthz", timeout=60).json()["status"] == "ok"  # probes carry no key


def test_the_openai_client_sends_its_key_and_a_wrong_one_is_its_authentication_error(served):
    import openai

    url, _, _ = served
    client = openai.OpenAI(base_url=f"{url}/v1", api_key=KEY, max_retries=0, timeout=60)
    assert len(client.images.generate(prompt="a", extra_body={"steps": 2}).data) == 1
    with pytest.raises(openai.AuthenticationError) as caught:
        client.with_options(api_key="wrong").images.generate(prompt="a", extra_body={"steps": 2})
    assert caught.value.status_code == 401 and "key is required" in caught.value.message


def test_hub_settings_reach_the_model_replica(served):
    _, handle, cache = served
    seen = handle.hub_settings.remote().result(timeout_s=30)
    assert seen == {"cache_dir": cache, "offline": True}


def test_no_key_is_open_and_warns_only_beyond_loopback(monkeypatch, caplog):
    monkeypatch.delenv("ARTAUG_API_KEY", raising=False)
    with caplog.at_level(logging.WARNING, logger="artaug.serve.edge"):
        assert key_digest(tiny_config()) is None  # 127.0.0.1: open, quietly
        assert not caplog.records
        assert key_digest(tiny_config(**{"serve.host": "0.0.0.0"})) is None
    assert "without an API key" in caplog.text and "ARTAUG_API_KEY" in caplog.text
    monkeypatch.setenv("ARTAUG_API_KEY", KEY)
    assert key_digest(tiny_config(**{"serve.host": "0.0.0.0"})) not in (None, KEY.encode())  # a digest


def test_a_failing_image_fails_only_its_request_and_a_broken_pipeline_fails_health(tiny_dir):
    """In-process replica (its pipeline calls; Serve's batching needs a replica): a call holding an
    image the pipeline cannot draw (a lone surrogate that slipped past the API's checks) still
    draws the others; a broken pipeline fails check_health, so Serve replaces the replica."""
    from artaug.serve.model import ImageTask

    model = FluxModel(tiny_config(**{"model.source": tiny_dir}))
    settings = (32, 32, 2, 3.5)

    async def call(prompts: list[str]) -> list:
        tasks = [ImageTask(p, seed, settings) for seed, p in enumerate(prompts)]
        return await model._call(asyncio.get_running_loop(), tasks, settings)

    good, bad, other = asyncio.run(call(["a red door", "a \ud800 door", "a blue door"]))
    assert isinstance(bad, TypeError)
    assert (good["seed"], other["seed"]) == (0, 2) and good["b64_json"] and other["b64_json"]
    assert model.stats()["failed_calls"] == 2  # the call of 3, then the bad image alone
    model.check_health()  # the probe after the failure drew fine: the replica is healthy
    assert model.ready()

    transformer = model.pipe.transformer
    transformer.proj_out.weight.data = transformer.proj_out.weight.data[:1]  # a corrupted replica
    (failed,) = asyncio.run(call(["a green door"]))
    assert isinstance(failed, Exception)
    with pytest.raises(RuntimeError, match="fails even on a one-step probe"):
        model.check_health()


def test_a_request_the_replica_cannot_draw_fails_alone(served):
    url, handle, _ = served
    bad = handle.generate.remote(ImageJob("a \ud800 door", 1, 16, 16, 2, 3.5, 0))
    good = requests.post(f"{url}/v1/images/generations", json={"prompt": "a door", "steps": 2}, headers=AUTH,
                         timeout=60)  # fmt: skip
    assert good.status_code == 200, good.text
    with pytest.raises(ImageFailed, match="the model failed on this request"):
        bad.result(timeout_s=60)
    assert requests.get(f"{url}/healthz", timeout=60).json()["status"] == "ok"


def test_resume_applies_the_runs_hub_settings(tmp_path, monkeypatch):
    from artaug.cli.run import cmd_run
    from artaug.config import ConfigError

    for name in ("HF_HUB_OFFLINE", "HF_HUB_CACHE"):
        monkeypatch.delenv(name, raising=False)
        monkeypatch.setattr(constants, name, getattr(constants, name))
    cache = str(tmp_path / "cache")
    cfg = tiny_config(**{"hub.offline": "true", "hub.cache_dir": cache})
    start(dataclasses.replace(cfg, prompts=str(tmp_path / "gone.txt")), str(tmp_path / "run"))
    # The prompt file is gone: the resume stops before Ray, after the run's settings were applied.
    with pytest.raises((ConfigError, Exception), match="gone.txt"):
        cmd_run(Namespace(resume=str(tmp_path / "run"), config=None, preset=None, overrides=[], out=None))
    assert os.environ["HF_HUB_OFFLINE"] == "1" and os.environ["HF_HUB_CACHE"] == cache
    assert constants.HF_HUB_OFFLINE is True and constants.HF_HUB_CACHE == cache


def test_a_replica_that_dies_mid_request_answers_json_500_and_health_recovers(served):
    """Last: the killed replica is replaced; its in-flight request gets an OpenAI error, not a crash."""
    url, handle, _ = served
    body = {"prompt": "a long night", "steps": 250, "size": "16x16"}  # 16 x 16 x 250 < COST
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(1) as pool:
        pending = pool.submit(requests.post, f"{url}/v1/images/generations", json=body, headers=AUTH,
                              timeout=120)  # fmt: skip
        steps, deadline = handle.stats.remote().result(timeout_s=30)["steps"], time.monotonic() + 60
        while handle.stats.remote().result(timeout_s=30)["steps"] == steps and time.monotonic() < deadline:
            time.sleep(0.05)
        (replica,) = [a for a in ray.util.list_named_actors(all_namespaces=True) if "FluxModel" in a["name"]]
        ray.kill(ray.get_actor(replica["name"], namespace=replica["namespace"]), no_restart=True)
        answer = pending.result()
    assert_openai_error(answer, 500, "the model failed on this request")
    deadline = time.monotonic() + 60
    while requests.get(f"{url}/healthz", timeout=30).status_code != 200:
        assert time.monotonic() < deadline, "no replica came back"
        time.sleep(0.2)
    ok = requests.post(f"{url}/v1/images/generations", json={"prompt": "a", "steps": 2}, headers=AUTH,
                       timeout=60)  # fmt: skip
    assert ok.status_code == 200, ok.text
