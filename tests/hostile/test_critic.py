"""Hostile critics and endpoints: answers that are not chat completions, broken streams, 5xx, dead
endpoints, redirects that would carry the key elsewhere, a critic that fails on most rows, and the
run's warm engine dying. Every endpoint here is a real HTTP server or socket started by the test;
each case asserts the clear error and that nothing was written or sent where it should not be."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pyarrow as pa
import pytest
import requests

from artaug import storage
from artaug.critic.answers import ANSWER, REQUEST, CriticFailedError, answer_row, check_failures
from artaug.critic.backends import critique_task
from artaug.critic.judge import parse_judgement
from artaug.critic.openai_backend import Endpoint, OpenAICritic
from artaug.critic.schema import CritiqueError, parse_critique
from artaug.images import data_url
from artaug.stages.critique import parse_answers
from tests.conftest import tiny_config

KEY = "the-runs-own-key"
DEEP = "[" * 100_000 + "]" * 100_000


def requests_batch(n: int) -> pa.Table:
    from PIL import Image

    url = data_url(Image.new("RGB", (16, 16), "navy"))
    rows = [{"prompt_id": f"p{i}", "prompt": "a boat", "seed": i, "round": 1, "image_url": url,
             "box_max": 1000, "box_scale_w": 1000, "box_scale_h": 1000, "error": None}
            for i in range(n)]  # fmt: skip
    return pa.Table.from_pylist(rows, schema=REQUEST)


def critic_cfg(url: str, **overrides):
    settings = {"critique.backend": "openai", "critique.base_url": url, "critique.max_retries": 2,
                "critique.backoff_s": 0.01, "critique.timeout_s": 5, "critique.concurrency": 2}  # fmt: skip
    return tiny_config(**{**settings, **overrides}).critique


class Endpoint200(BaseHTTPRequestHandler):
    """Answers /v1/models with one model and every chat request with `answer` (bytes); records what
    it was sent. `declared` > len(answer) announces more bytes than come: a stream that breaks off."""

    answer: bytes = b""
    declared: int | None = None
    status = 200
    headers_seen: list = []

    def do_GET(self):
        type(self).headers_seen.append(dict(self.headers))
        self._send(200, json.dumps({"data": [{"id": "m"}]}).encode())

    def do_POST(self):
        self.rfile.read(int(self.headers["Content-Length"]))
        type(self).headers_seen.append(dict(self.headers))
        self._send(self.status, self.answer, self.declared)

    def _send(self, status, data, declared=None):
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(declared or len(data)))
        for name, value in getattr(self, "extra_headers", {}).items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(data)
        if declared:
            self.close_connection = True

    def log_message(self, *args):
        pass


def serve(handler_attrs: dict, host="127.0.0.1"):
    """A real HTTP server on a free port with a handler class of its own; returns (server, handler)."""
    handler = type("Handler", (Endpoint200,), {"headers_seen": [], **handler_attrs})
    server = ThreadingHTTPServer((host, 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, handler


def ask_directly(url: str, n: int = 4, endpoint: Endpoint | None = None, **overrides) -> list[dict]:
    critic = OpenAICritic(critic_cfg(url, **overrides), critique_task("norm1000"), endpoint or Endpoint(url))
    table = critic(requests_batch(n))
    assert table.schema == ANSWER and table.num_rows == n  # one answer row per request, never a crash
    return table.to_pylist()


@pytest.mark.parametrize(
    ("answer", "expected"),
    [
        (b"<html>502 Bad Gateway</html>", "not a chat completion (JSONDecodeError)"),
        (b'{"choices": []}', "not a chat completion (IndexError)"),
        (b'{"choices": [{"message": {"content": 42}}]}', "content is int, not text"),
        (DEEP.encode(), "not a chat completion (RecursionError)"),
    ],
    ids=["html", "no-choices", "content-not-text", "nested-too-deeply"],
)
def test_a_200_that_is_not_a_chat_completion_is_that_rows_error(answer, expected):
    server, _ = serve({"answer": answer})
    try:
        rows = ask_directly(f"http://127.0.0.1:{server.server_address[1]}/v1")
    finally:
        server.shutdown()
    assert all(row["raw"] is None and expected in row["error"] for row in rows), rows[0]["error"]
    parsed = parse_answers(pa.Table.from_pylist(rows, schema=ANSWER), "openai", "norm1000").to_pylist()
    assert {row["status"] for row in parsed} == {"failed"}


def test_a_broken_stream_is_retried_then_becomes_the_rows_error():
    server, handler = serve({"answer": b'{"choices": [', "declared": 5000})
    try:
        rows = ask_directly(f"http://127.0.0.1:{server.server_address[1]}/v1", n=2)
    finally:
        server.shutdown()
    assert all("broken answer" in row["error"] and "after 2 retries" in row["error"] for row in rows)
    assert len(handler.headers_seen) == 1 + 2 * 3  # /models once, then each row tried 1 + 2 retries


def test_5xx_forever_fails_each_row_after_its_retries():
    server, handler = serve({"answer": b'{"error": "overloaded"}', "status": 503})
    try:
        rows = ask_directly(f"http://127.0.0.1:{server.server_address[1]}/v1", n=3)
    finally:
        server.shutdown()
    assert all(row["error"].startswith("HTTP 503") and "after 2 retries" in row["error"] for row in rows)
    assert len(handler.headers_seen) == 1 + 3 * 3


def test_hostile_answer_text_is_stored_and_parsed_not_crashing():
    # A lone surrogate (valid JSON escape, invalid UTF-8) in the content, and deeply nested content.
    surrogate = json.dumps({"choices": [{"message": {"content": '{"rating": "\\ud800"}'}}]})
    server, _ = serve({"answer": surrogate.encode().replace(b"\\\\ud800", b"\\ud800")})
    try:
        rows = ask_directly(f"http://127.0.0.1:{server.server_address[1]}/v1", n=2)
    finally:
        server.shutdown()
    assert rows[0]["error"] is None and "\ufffd" not in rows[0]["raw"] and "?" in rows[0]["raw"]
    parsed = parse_answers(pa.Table.from_pylist(rows, schema=ANSWER), "openai", "norm1000").to_pylist()
    assert {row["status"] for row in parsed} == {"invalid"}
    with pytest.raises(CritiqueError, match="nested too deeply"):
        parse_critique(DEEP)
    assert parse_judgement(DEEP) == (None, "unparseable: nested too deeply")
    row = requests_batch(1).to_pylist()[0]
    assert answer_row(row, {"not": "text"}, None, 0.0, "m")["error"] == "the answer is dict, not text"


def test_a_dead_endpoint_trips_the_breaker_instead_of_retrying_every_row():
    """A port that accepts and drops every connection (an engine that died behind its socket)."""
    listener = socket.create_server(("127.0.0.1", 0))
    accepted = []

    def drop():
        while True:
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            accepted.append(1)
            conn.close()

    threading.Thread(target=drop, daemon=True).start()
    url = f"http://127.0.0.1:{listener.getsockname()[1]}/v1"
    start = time.monotonic()
    try:
        rows = ask_directly(url, n=40, endpoint=Endpoint(url), **{"critique.model": "named-model",
                            "critique.max_retries": 3, "critique.backoff_s": 0.2})  # fmt: skip
    finally:
        listener.close()
    # Without the breaker: 40 rows x 4 attempts, 1.4 s of backoff per row (about 28 s at concurrency 2).
    assert time.monotonic() - start < 5
    assert len(accepted) <= 5 + 2  # the breaker's count, plus what was in flight when it opened
    unreachable = [row for row in rows if "unreachable (5 connection failures in a row)" in row["error"]]
    assert len(unreachable) >= 38 and url.rstrip("/") in unreachable[0]["error"]


def test_the_key_goes_only_to_the_configured_endpoint_never_through_a_redirect():
    elsewhere, seen_elsewhere = serve({"answer": b"{}"})
    target = f"http://localhost:{elsewhere.server_address[1]}/v1/chat/completions"
    redirecting, seen = serve({"answer": b"", "status": 307, "extra_headers": {"Location": target}})
    url = f"http://127.0.0.1:{redirecting.server_address[1]}/v1"
    try:
        rows = ask_directly(url, n=2, endpoint=Endpoint(url, KEY))
    finally:
        redirecting.shutdown()
        elsewhere.shutdown()
    assert all(row["error"] == f"HTTP 307: redirect to {target} not followed" for row in rows)
    assert seen_elsewhere.headers_seen == []  # the other host never heard from us, key or not
    assert {h["Authorization"] for h in seen.headers_seen} == {f"Bearer {KEY}"}  # models and chat requests
    assert KEY not in repr(Endpoint(url, KEY))


# ------------------------------------------------------------------ stages (Ray)


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory) -> str:
    from PIL import Image

    folder = tmp_path_factory.mktemp("hostile-images")
    for i in range(4):
        Image.new("RGB", (32, 32), (40 * i, 90, 200)).save(folder / f"img{i}.png")
    return str(folder)


def test_a_critique_stage_whose_critic_failed_on_most_rows_fails_without_output(
    ray_local, image_folder, tmp_path
):
    from artaug.stages.critique import critique

    server, _ = serve({"answer": b"<html>not json</html>"})
    url = f"http://127.0.0.1:{server.server_address[1]}/v1"
    cfg = tiny_config(**{"critique.backend": "openai", "critique.base_url": url, "critique.max_retries": 0})
    out = tmp_path / "critique"
    try:
        with pytest.raises(CriticFailedError) as caught:
            critique(cfg, image_folder, str(out))
    finally:
        server.shutdown()
    message = str(caught.value)
    assert "\n" not in message and "failed on 4 of 4 rows" in message and "max_failed_fraction 0.5" in message
    assert "not a chat completion" in message
    assert not storage.is_complete(str(out))
    assert not out.exists() or not any(p.suffix == ".parquet" for p in out.rglob("*"))  # no rows written


def test_the_failed_fraction_rule():
    check_failures("critique", ["refused", None, None], 0.5)  # 1 of 3: within the bound
    check_failures("critique", ["refused"] * 3, 1.0)  # 1.0: failed rows never fail the stage
    check_failures("critique", [], 0.0)  # nothing asked, nothing failed
    with pytest.raises(CriticFailedError, match="failed on 1 of 3 rows .* first error: HTTP 500 oops"):
        check_failures("critique", [None, "HTTP 500\n oops", None], 0.0)


def test_the_judge_fails_when_its_endpoint_is_dead(ray_local):
    from PIL import Image

    from artaug.critic.judge import judge_pairs
    from artaug.images import png_bytes
    from tests.conftest import free_port

    url = f"http://127.0.0.1:{free_port()}/v1"  # nothing listens: connection refused
    cfg = tiny_config(**{"evaluate.judge_backend": "openai", "evaluate.judge_base_url": url,
                         "critique.max_retries": 1, "critique.backoff_s": 0.01})  # fmt: skip
    png = png_bytes(Image.new("RGB", (16, 16), "white"))
    pairs = [{"prompt_id": f"p{i}", "prompt": "x", "seed": i, "base": png, "lora": png} for i in range(3)]
    with pytest.raises(CriticFailedError, match="judge: the critic failed on 6 of 6 rows") as caught:
        judge_pairs(cfg, pairs, "tiny")
    assert "ConnectionError" in str(caught.value) and "\n" not in str(caught.value)


def test_a_pair_whose_image_does_not_decode_is_not_asked_and_counts_missing():
    from PIL import Image

    from artaug.critic.judge import judge_rows
    from artaug.images import png_bytes

    png = png_bytes(Image.new("RGB", (16, 16), "white"))
    pairs = [{"prompt_id": "good", "prompt": "x", "seed": 0, "base": png, "lora": png},
             {"prompt_id": "cut", "prompt": "x", "seed": 1, "base": png[:40], "lora": png}]  # fmt: skip
    rows = judge_rows(pairs, side=16)
    assert [row["prompt_id"] for row in rows] == ["good#lora_right", "good#lora_left"]


# ------------------------------------------------------------------ the run's warm engine

# A stand-in for vLLM's server (a real process with vLLM's key rule: /health open, /v1 needs the key),
# so the engine's death and restart take a second, not a minute per start.
STAND_IN = """
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
host, port, key = sys.argv[1], int(sys.argv[2]), sys.argv[3]
class H(BaseHTTPRequestHandler):
    def do_GET(self):
        ok = self.path == "/health" or self.headers.get("Authorization") == "Bearer " + key
        self.send_response(200 if ok else 401)
        self.send_header("Content-Length", "0")
        self.end_headers()
ThreadingHTTPServer((host, port), H).serve_forever()
"""


def stand_in(model, cfg, host, port, log_path, api_key=None):
    command = [sys.executable, "-c", STAND_IN, host, str(port), api_key or "", "artaug-stand-in"]
    return subprocess.Popen(command, stdout=subprocess.DEVNULL), f"http://{host}:{port}/v1"


def kill_server(url: str, marker: str) -> None:
    """SIGKILL the server process listening at `url` (found by its command line)."""
    import psutil

    port = url.rsplit(":", 1)[1].split("/")[0]
    commands = [(p, p.info["cmdline"] or []) for p in psutil.process_iter(["cmdline"])]
    victims = [p for p, command in commands if marker in " ".join(command) and port in command]
    assert len(victims) == 1, victims
    victims[0].kill()
    # Not our child: it stays a zombie until its parent (the engine actor) looks at it.
    deadline = time.monotonic() + 10
    while victims[0].is_running() and victims[0].status() != psutil.STATUS_ZOMBIE:
        assert time.monotonic() < deadline
        time.sleep(0.05)


def test_a_dead_engine_is_restarted_once_then_fails_the_stage(ray_local):
    import cloudpickle

    from artaug.critic.engine import CriticEngineError, WarmEngine

    cloudpickle.register_pickle_by_value(sys.modules[__name__])  # Ray workers need not import tests/
    engine = WarmEngine(tiny_config().critique, "tiny", ready_timeout_s=60, local=True, launch=stand_in)
    try:
        first = engine.endpoint()
        assert first.url.startswith("http://127.0.0.1:")  # a local run's engine listens on loopback only
        assert requests.get(first.url + "/models", timeout=5).status_code == 401  # no key, no answer
        headers = {"Authorization": f"Bearer {first.key}"}
        assert requests.get(first.url + "/models", headers=headers, timeout=5).status_code == 200
        assert engine.endpoint() == first and engine.restarts == 0  # healthy: handed out as it is
        with engine.busy():  # a stage asking it
            time.sleep(0.2)

        kill_server(first.url, "artaug-stand-in")
        second = engine.endpoint()
        assert engine.restarts == 1 and second.key == first.key
        assert requests.get(second.url + "/models", headers=headers, timeout=5).status_code == 200

        kill_server(second.url, "artaug-stand-in")
        with pytest.raises(CriticEngineError, match="died again after a restart"):
            engine.endpoint()
    finally:
        engine.close()
    usage = engine.usage()  # held over both engines' lives (the restart included), busy while asked
    assert usage["restarts"] == 1 and 0.2 <= usage["busy_s"] < usage["held_s"], usage
    assert usage == engine.usage()  # closed: nothing is held any more
