"""The HTTP image API on Ray Serve: one application deployed for the module, a real HTTP client.

The app serves the saved tiny FLUX with a random LoRA fused in. Tests that watch work stop read the
model replica's own counters (`FluxModel.stats`): denoising steps run, calls cancelled.
"""

from __future__ import annotations

import base64
import dataclasses
import io
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import ray
import requests
from PIL import Image
from ray import serve

from artaug.models.sampling import Job, sample
from artaug.models.synthesis import load_pipeline
from artaug.serve.app import build_app
from artaug.serve.edge import MAX_BODY_BYTES
from artaug.serve.launch import resolve_config
from tests.conftest import free_port
from tests.test_models import make_lora

APP = "artaug-test"
SLOW_STEPS = 3000  # far more than any test waits for: only cancellation ends such a call early


@pytest.fixture(scope="module")
def lora_file(tmp_path_factory) -> str:
    return make_lora(tmp_path_factory.mktemp("serve-lora"), seed=1)


@pytest.fixture(scope="module")
def served(ray_local, tiny_dir, lora_file):
    """The app on 127.0.0.1:<free port>; yields (base URL, resolved config, model handle)."""
    port = free_port()
    cfg = resolve_config(
        lora=lora_file,
        overrides=[
            f"model.source={tiny_dir}",
            f"serve.port={port}",
            f"serve.app_name={APP}",
            f"serve.max_steps={SLOW_STEPS}",
        ],
    )
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(build_app(cfg), name=APP, route_prefix="/")
    yield f"http://127.0.0.1:{port}", cfg, serve.get_deployment_handle("FluxModel", app_name=APP)
    serve.shutdown()


def post(url: str, body, **kwargs) -> requests.Response:
    return requests.post(f"{url}/v1/images/generations", json=body, timeout=120, **kwargs)


def decode(b64: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(b64))).convert("RGB"))


def stats(handle) -> dict:
    return handle.stats.remote().result(timeout_s=30)


def reference_images(cfg, prompt: str, seeds: list[int], size=(64, 64), steps=None, guidance=None):
    """What the generate stage's sampling draws for these rows, in-process (one call, as the replica)."""
    images = sample(
        load_pipeline(cfg.model),
        [Job(prompt, seed) for seed in seeds],
        width=size[0],
        height=size[1],
        steps=steps or cfg.generate.steps,
        guidance=cfg.generate.guidance if guidance is None else guidance,
        max_sequence_length=cfg.model.max_sequence_length,
    )
    return [np.asarray(image.convert("RGB")) for image in images]


def test_served_images_equal_the_generate_stages_sampling(served):
    url, cfg, handle = served
    prompt = "a lighthouse on a cliff at dusk"
    one = post(url, {"prompt": prompt, "seed": 7})
    assert one.status_code == 200, one.text
    body = one.json()
    assert body["model"] == cfg.serve.model_name and body["size"] == "64x64"
    assert [d["seed"] for d in body["data"]] == [7]
    settings = {"size": "64x48", "steps": 3, "guidance": 5.5}
    two = post(url, {"prompt": prompt, "seed": 11, "n": 2, "model": cfg.serve.model_name, **settings})
    assert two.status_code == 200, two.text
    assert [d["seed"] for d in two.json()["data"]] == [11, 12]
    assert (two.json()["size"], two.json()["steps"], two.json()["guidance"]) == ("64x48", 3, 5.5)

    (expected_one,) = reference_images(cfg, prompt, [7])
    expected_two = reference_images(cfg, prompt, [11, 12], size=(64, 48), steps=3, guidance=5.5)
    np.testing.assert_array_equal(decode(body["data"][0]["b64_json"]), expected_one)
    for served_image, expected in zip(two.json()["data"], expected_two, strict=True):
        np.testing.assert_array_equal(decode(served_image["b64_json"]), expected)
    # The LoRA is really fused (the base model draws something else) and no LoRA layer is left.
    base_cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, loras=[]))
    (base,) = reference_images(base_cfg, prompt, [7])
    assert np.abs(base.astype(int) - expected_one.astype(int)).max() > 0
    assert stats(handle)["lora_layers"] == 0


BAD_REQUESTS = [
    # (body or raw text, status, words the message must contain)
    ("{not json", 400, "not valid JSON"),
    ([1, 2], 400, "JSON object"),
    ({}, 400, "prompt is required"),
    ({"prompt": 5}, 400, "prompt"),
    ({"prompt": "   "}, 400, "prompt must not be empty"),
    ({"prompt": "x" * 2001}, 400, "limit is 2000"),
    ({"prompt": "a", "n": 0}, 400, "n must be between 1 and 4"),
    ({"prompt": "a", "n": 5}, 400, "n must be between 1 and 4"),
    ({"prompt": "a", "n": "2"}, 400, "n"),
    ({"prompt": "a", "n": 1.5}, 400, "n"),
    ({"prompt": "a", "n": True}, 400, "n"),
    ({"prompt": "a", "size": "64"}, 400, 'size must look like "512x512"'),
    ({"prompt": "a", "size": "100x64"}, 400, "width 100 is not a positive multiple of 16"),
    ({"prompt": "a", "size": "64x0"}, 400, "height 0 is not a positive multiple of 16"),
    ({"prompt": "a", "size": "-16x64"}, 400, "size must look like"),
    ({"prompt": "a", "size": "512x512"}, 400, "above the limit of 256"),
    ({"prompt": "a", "size": 64}, 400, "size"),
    ({"prompt": "a", "steps": 0}, 400, "steps must be between 1"),
    ({"prompt": "a", "steps": SLOW_STEPS + 1}, 400, "steps must be between 1"),
    ({"prompt": "a", "steps": "4"}, 400, "steps"),
    ({"prompt": "a", "guidance": -1}, 400, "guidance must be between 0 and 100"),
    ({"prompt": "a", "guidance": "high"}, 400, "guidance"),
    ('{"prompt": "a", "guidance": NaN}', 400, "guidance"),
    ({"prompt": "a", "seed": -1}, 400, "seed must be in"),
    ({"prompt": "a", "seed": 2**63}, 400, "seed must be in"),
    ({"prompt": "a", "seed": 1.5}, 400, "seed"),
    ({"prompt": "a", "timeout": 0}, 400, "timeout must be in"),
    ({"prompt": "a", "timeout": 1e9}, 400, "timeout must be in"),
    ({"prompt": "a", "response_format": "url"}, 400, "response_format"),
    ({"prompt": "a", "quality": "hd"}, 400, "quality is not a known field"),
    ({"prompt": "a", "model": "../../etc/lora.safetensors"}, 404, "is not served here"),
    ("x" * 2_000_000, 413, "the limit is"),
]


@pytest.mark.parametrize("body, status, words", BAD_REQUESTS, ids=range(len(BAD_REQUESTS)))
def test_bad_requests_get_a_clear_4xx(served, body, status, words):
    url, _, _ = served
    if isinstance(body, str):
        headers = {"Content-Type": "application/json"}
        answer = requests.post(f"{url}/v1/images/generations", data=body, headers=headers, timeout=60)
    else:
        answer = post(url, body)
    assert answer.status_code == status, answer.text
    assert words in answer.json()["error"]["message"]


def test_wrong_routes_and_methods_are_4xx(served):
    url, _, _ = served
    assert requests.get(f"{url}/v1/images/generations", timeout=60).status_code == 405
    assert requests.post(f"{url}/v1/nothing", json={}, timeout=60).status_code == 404
    plain = requests.post(f"{url}/v1/images/generations", data="prompt=a", timeout=60)
    assert 400 <= plain.status_code < 500


def test_models_health_and_docs(served, lora_file):
    url, cfg, _ = served
    models = requests.get(f"{url}/v1/models", timeout=60).json()
    (card,) = models["data"]
    assert card["id"] == cfg.serve.model_name
    assert card["loras"] == ["pytorch_lora_weights.safetensors"]  # names only, never server paths
    assert requests.get(f"{url}/healthz", timeout=60).json()["status"] == "ok"
    schema = requests.get(f"{url}/openapi.json", timeout=60).json()
    assert {"/v1/images/generations", "/v1/models", "/healthz"} <= set(schema["paths"])
    assert "seed" in schema["components"]["schemas"]["ImageRequest"]["properties"]
    assert requests.get(f"{url}/docs", timeout=60).status_code == 200


def test_32_concurrent_requests_all_succeed_in_batches(served):
    url, cfg, handle = served
    before = stats(handle)
    # Blocks of 8 with two sizes and step counts: only equal settings may share a pipeline call.
    settings = [{"size": "64x64", "steps": 2}, {"size": "48x32", "steps": 3}]
    bodies = [{"prompt": f"a garden, {i}", "seed": i, **settings[(i // 8) % 2]} for i in range(32)]
    with ThreadPoolExecutor(32) as pool:
        answers = list(pool.map(lambda b: post(url, b), bodies))
    assert [a.status_code for a in answers] == [200] * 32, [a.text for a in answers if a.status_code != 200]
    for body, answer in zip(bodies, answers, strict=True):
        (image,) = answer.json()["data"]
        assert image["seed"] == body["seed"]
        width, height = map(int, body["size"].split("x"))
        assert decode(image["b64_json"]).shape == (height, width, 3)
    after = stats(handle)
    assert after["images"] - before["images"] == 32
    assert after["largest_call"] <= cfg.serve.max_batch_size
    assert after["calls"] - before["calls"] < 32, "no two requests were ever batched together"


def test_overload_answers_503_with_retry_after_then_recovers(served):
    url, cfg, _ = served
    s = cfg.serve
    # More requests than one replica holds (max_ongoing) plus its queue (max_queued); slow enough
    # (25 steps each) that the queue is still full while the last ones arrive.
    count = 2 * (s.max_ongoing_requests + s.max_queued_requests)
    body = {"prompt": "a crowded street", "steps": 25}
    with ThreadPoolExecutor(count) as pool:
        answers = list(pool.map(lambda i: post(url, {**body, "seed": i}), range(count)))
    codes = [a.status_code for a in answers]
    assert set(codes) <= {200, 503}, codes
    busy = [a for a in answers if a.status_code == 503]
    assert busy, "nothing was refused: the queue is not bounded"
    assert codes.count(200) >= s.max_ongoing_requests
    for answer in busy:
        assert int(answer.headers["Retry-After"]) == s.retry_after_s
    assert any("at capacity" in a.text for a in busy)
    # Every accepted request finished; the server takes new work again.
    assert post(url, {"prompt": "a quiet street", "seed": 1}).status_code == 200


def wait_for(condition, what: str, timeout: float = 60.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def open_request(url: str, prompt: str, seed: int) -> socket.socket:
    """A slow request sent on a raw connection that stays open (and waiting) until it is closed."""
    host, port = url.removeprefix("http://").split(":")
    body = f'{{"prompt": "{prompt}", "steps": {SLOW_STEPS}, "seed": {seed}}}'.encode()
    client = socket.create_connection((host, int(port)))
    client.sendall(
        b"POST /v1/images/generations HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\n"
        + f"Content-Length: {len(body)}\r\n\r\n".encode()
        + body
    )
    return client


def test_client_that_disconnects_stops_its_work(served):
    url, _, handle = served
    before = stats(handle)
    client = open_request(url, "an endless staircase", 3)
    wait_for(lambda: stats(handle)["steps"] > before["steps"], "the slow call to start")
    client.close()
    after = wait_for(
        lambda: (s := stats(handle))["cancelled_calls"] > before["cancelled_calls"] and s, "the cancellation"
    )
    assert after["steps"] - before["steps"] < SLOW_STEPS
    time.sleep(0.5)
    assert stats(handle)["steps"] == after["steps"], "steps still run after the cancellation"


def test_request_timeout_answers_504_and_stops_the_work(served):
    url, _, handle = served
    before = stats(handle)
    answer = post(url, {"prompt": "a very long walk", "steps": SLOW_STEPS, "timeout": 1})
    assert answer.status_code == 504, answer.text
    assert "not ready within 1 s" in answer.json()["error"]["message"]
    after = wait_for(
        lambda: (s := stats(handle))["cancelled_calls"] > before["cancelled_calls"] and s, "the cancellation"
    )
    assert after["steps"] - before["steps"] < SLOW_STEPS


def test_enhancing_needs_a_server_started_with_a_critic(served):
    url = served[0]
    answer = post(url, {"prompt": "a red door", "enhance": True})
    assert answer.status_code == 400 and answer.json()["error"]["param"] == "enhance"
    assert "started without serve.enhance" in answer.json()["error"]["message"]
    image = base64.b64encode(b"\x89PNG").decode()
    answer = requests.post(f"{url}/v1/images/enhance", json={"image": image, "prompt": "a"}, timeout=60)
    assert answer.status_code == 400 and "started without serve.enhance" in answer.text


# ---------------------------------------------------------------- the official `openai` client


def openai_client(url: str, **kwargs):
    from openai import OpenAI

    return OpenAI(base_url=f"{url}/v1", api_key="not-checked-here", timeout=120, **kwargs)


def test_the_openai_client_gets_the_images_our_api_gives(served):
    url, cfg, _ = served
    body = {"prompt": "a red door", "n": 2, "size": "32x32", "steps": 2, "seed": 7}
    result = openai_client(url, max_retries=0).images.generate(
        model=cfg.serve.model_name, prompt=body["prompt"], n=2, size="32x32", response_format="b64_json",
        extra_body={"steps": 2, "seed": 7},
    )  # fmt: skip
    ours = post(url, body).json()
    assert [image.model_extra["seed"] for image in result.data] == [7, 8]
    assert result.size == "32x32" and result.model_extra["steps"] == 2  # size is in the client's type
    for theirs, mine in zip(result.data, ours["data"], strict=True):
        assert decode(theirs.b64_json).shape == (32, 32, 3)
        assert np.array_equal(decode(theirs.b64_json), decode(mine["b64_json"]))


def test_each_refusal_arrives_as_the_openai_clients_own_error(served):
    import openai

    url, cfg, _ = served
    images = openai_client(url, max_retries=0).images
    slow = {"steps": SLOW_STEPS, "timeout": 1}
    cases = [
        (openai.BadRequestError, 400, {"prompt": "  "}, "prompt must not be empty"),
        (openai.NotFoundError, 404, {"prompt": "a", "model": "not-this-one"}, "is not served here"),
        (openai.APIStatusError, 413, {"prompt": "x" * (MAX_BODY_BYTES + 1)}, "the limit is 1048576"),
        (
            openai.InternalServerError,
            504,
            {"prompt": "a long walk", "extra_body": slow},
            "not ready within 1 s",
        ),
    ]
    errors = {}
    for error_type, status, call, words in cases:
        with pytest.raises(openai.APIStatusError) as caught:
            images.generate(**call)
        errors[status] = error = caught.value
        assert type(error) is error_type and error.status_code == status and words in error.message, error
        assert set(error.body) == {"message", "type", "param", "code"}  # our error object, parsed
    assert (errors[400].type, errors[400].param) == ("invalid_request_error", "prompt")
    assert (errors[404].type, errors[404].param) == ("model_not_found", "model")
    assert errors[504].type == "timeout"


def test_a_busy_server_is_the_clients_503_and_its_retry_after_is_honoured(served):
    """Slow requests on open connections fill the replica and its queue until they are closed. A client
    without retries gets the 503; one with its own retry logic waits Retry-After, not its own back-off
    (at most 0.5 s before a first retry), and gets its images once the connections are closed."""
    import openai

    url, cfg, _ = served
    s, attempts, blockers = cfg.serve, [], []
    refused = threading.Event()

    def fill() -> bool:
        # The proxy drops what arrives faster than the ingress admits it (a 503 to that blocker), so a
        # fixed count may leave the model's queue short under load: add blockers until a probe is refused.
        blockers.extend(open_request(url, "a blocked road", len(blockers) + i) for i in range(8))
        return full(impatient)

    def on_response(response):
        attempts.append((response.status_code, time.monotonic()))
        if response.status_code == 503:
            refused.set()

    hooks = {"request": [lambda _: attempts.append(("sent", time.monotonic()))], "response": [on_response]}
    http = openai.DefaultHttpxClient(event_hooks=hooks)
    patient = openai_client(url, max_retries=8, http_client=http)  # more than the default 2: see below
    try:
        impatient = openai_client(url, max_retries=0).images
        wait_for(fill, "the queue to be full")
        with pytest.raises(openai.InternalServerError) as caught:
            impatient.generate(prompt="a", extra_body={"steps": 2, "timeout": 5})
        assert caught.value.status_code == 503 and "at capacity" in caught.value.message
        assert caught.value.response.headers["retry-after"] == str(s.retry_after_s)
        with ThreadPoolExecutor(1) as pool:
            result = pool.submit(patient.images.generate, prompt="a quiet road", extra_body={"steps": 2})
            assert refused.wait(60), "the patient client was never refused"
            time.sleep(1.5)  # a retry or two is refused too, then the queue empties
            for blocker in blockers:
                blocker.close()
            assert len(result.result(timeout=120).data) == 1
    finally:
        for blocker in blockers:
            blocker.close()
    statuses = [status for status, _ in attempts if status != "sent"]
    assert statuses[0] == 503 and statuses[-1] == 200 and set(statuses[:-1]) == {503}, statuses
    sent = [when for status, when in attempts if status == "sent"]
    refusals = [when for status, when in attempts if status == 503]
    for answered, retried in zip(refusals, sent[1:], strict=True):
        assert retried - answered >= s.retry_after_s - 0.05, (retried - answered, attempts)


def full(images) -> bool:
    """Whether a request is refused at once (503) rather than queued (then 504 after its 1 s)."""
    import openai

    try:
        images.generate(prompt="a probe", extra_body={"steps": 2, "timeout": 1})
    except openai.InternalServerError as err:
        return err.status_code == 503
    except openai.APIStatusError:
        return False
    return False


def test_shutdown_finishes_in_flight_requests_then_closes(served):
    """Last in the module: deleting the app lets a running request finish, then nothing is left."""
    url, _, handle = served
    results = {}
    before = stats(handle)["steps"]
    thread = threading.Thread(
        target=lambda: results.setdefault("answer", post(url, {"prompt": "last light", "steps": 200}))
    )
    thread.start()
    wait_for(lambda: stats(handle)["steps"] > before, "the request to start")
    serve.delete(APP)
    thread.join(120)
    assert results["answer"].status_code == 200
    assert requests.get(f"{url}/v1/models", timeout=60).status_code == 404  # the route is gone
    serve.shutdown()
    with pytest.raises(requests.ConnectionError):
        requests.get(f"{url}/healthz", timeout=10)
    left = [a for a in ray.util.list_named_actors(all_namespaces=True) if "SERVE" in a["name"]]
    assert not left, left
