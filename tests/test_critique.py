"""The critique stage end to end: heuristic, vLLM through ray.data.llm, and a real OpenAI-compatible
vLLM server (the session's, tests/conftest.py), with corrupt images and dead endpoints among the inputs."""

import glob
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import SimpleNamespace

import jsonschema
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from artaug import storage
from artaug.cli import main as cli
from artaug.critic.backends import critic_model
from artaug.critic.heuristic import heuristic_critique
from artaug.critic.schema import critique_schema
from artaug.images import decode_image
from artaug.rows import GENERATE
from artaug.stages import parts
from artaug.stages.contract import read_stage
from artaug.stages.critique import critique
from tests.conftest import tiny_config, world_config

CORRUPT_ID = "corrupt"


@pytest.fixture(scope="module")
def images(ray_local, tmp_path_factory) -> str:
    """A completed generate output with 6 images, plus one corrupt image and one failed row."""
    from artaug.prompts import read_prompts
    from artaug.stages.generate import generate

    folder = tmp_path_factory.mktemp("crit-in")
    scenes = ["a red circle on blue", "an orange square on white", "a black triangle on yellow"]
    (folder / "p.txt").write_text("\n".join(scenes * 2) + "\n")
    stage = str(folder / "generate")
    generate(world_config(**{"generate.num_actors": 1}), read_prompts(str(folder / "p.txt")), stage)
    extra = [
        {"prompt_id": CORRUPT_ID, "prompt": "broken", "seed": 1, "round": 1, "image": b"\x89PNG garbage"},
        {"prompt_id": "failed-gen", "prompt": "nothing", "seed": 2, "round": 1, "error": "OOM"},
    ]
    rows = [{name: row.get(name) for name in GENERATE.names} for row in extra]
    pq.write_table(pa.Table.from_pylist(rows, schema=GENERATE), f"{stage}/extra.parquet")
    return stage


def rows_by_id(stage_dir: str) -> dict:
    return {row["prompt_id"]: row for row in read_stage(stage_dir).to_pylist()}


def assert_every_image_critiqued(rows: dict, backend: str) -> None:
    assert len(rows) == 8  # one row per input row
    assert rows[CORRUPT_ID]["status"] == "failed" and "corrupt image" in rows[CORRUPT_ID]["error"]
    assert (
        rows["failed-gen"]["status"] == "failed" and "generation failed: OOM" in rows["failed-gen"]["error"]
    )
    good = [row for key, row in rows.items() if key not in (CORRUPT_ID, "failed-gen")]
    for row in good:
        assert row["backend"] == backend and row["round"] == 1
        # Every answer conforms to the schema: the constraint really reached the decoder.
        jsonschema.validate(json.loads(row["raw"], strict=False), critique_schema())
        assert row["status"] == "ok", row["error"]
        parsed = json.loads(row["critique"])
        assert 1 <= parsed["rating"] <= 10 and row["rating"] == parsed["rating"]
        for region in parsed["regions"]:
            x0, y0, x1, y1 = region["box"]
            assert 0 <= x0 < x1 <= 1 and 0 <= y0 < y1 <= 1


def test_heuristic_backend_via_cli(images, tmp_path, capsys):
    out = str(tmp_path / "h")
    assert cli(["critique", "--images", images, "--out", out, "--set", "critique.backend=heuristic"]) == 0
    assert "8 rows: 6 ok, 0 invalid, 2 failed" in capsys.readouterr().out
    rows = rows_by_id(f"{out}/critique")
    assert_every_image_critiqued(rows, "heuristic")
    assert storage.read_summary(f"{out}/critique")["failed"] == 2


def test_world_critic_via_cli_asks_in_the_world_s_words(images, tmp_path, capsys):
    from artaug import world

    out = str(tmp_path / "w")
    assert cli(["critique", "--images", images, "--out", out]) == 0  # the world preset's critic
    assert "8 rows: 6 ok, 0 invalid, 2 failed" in capsys.readouterr().out
    rows = rows_by_id(f"{out}/critique")
    assert_every_image_critiqued(rows, "world")
    notes = [
        a["note"] for r in rows.values() if r["critique"] for a in json.loads(r["critique"])["adjustments"]
    ]
    assert notes and set(notes) <= set(world.MIDDLE.values())


def test_critique_follows_a_generate_stage_while_it_is_written(images, tmp_path):
    """The loop's overlap: the critique answers the first part before the rest is generated (the
    writer waits for a critique row before it writes more), and ends with one row per image."""
    rows = read_stage(images).to_pylist()
    source, out = str(tmp_path / "generate"), str(tmp_path / "critique")

    def write() -> None:
        parts.write_part(source, "part-w-00000", pa.Table.from_pylist(rows[:3], schema=GENERATE), "k")
        deadline = time.monotonic() + 120
        while not glob.glob(f"{out}/*.parquet"):
            assert time.monotonic() < deadline, "no critique of the first part while generate was running"
            time.sleep(0.1)
        parts.write_part(source, "part-w-00001", pa.Table.from_pylist(rows[3:], schema=GENERATE), "k")
        storage.mark_complete(source, {"stage": "generate", "rows": len(rows)})

    thread = threading.Thread(target=write)
    writer = SimpleNamespace(started=time.time(), running=thread.is_alive)
    thread.start()
    summary = critique(world_config(), source, out, writer=writer)
    thread.join()
    assert summary["input_batches"] == 2 and summary["rows"] == 8
    assert_every_image_critiqued(rows_by_id(out), "world")


@pytest.mark.heavy
def test_vllm_backend_through_ray_data_llm(images, tmp_path):
    """The vLLM critic (the tiny random VLM) on the miniature world's pictures."""
    summary = critique(world_config(**{"critique.backend": "vllm"}), images, str(tmp_path / "critique"))
    rows = rows_by_id(str(tmp_path / "critique"))
    assert_every_image_critiqued(rows, "vllm")
    assert summary["ok"] == 6 and summary["failed"] == 2


@pytest.mark.heavy
def test_openai_backend_against_a_real_vllm_server(ray_local, images, vlm_server, tmp_path):
    import requests

    from artaug.critic.openai_backend import Endpoint

    # The server requires its key (given as `artaug critic serve` and the run's engine give it).
    assert requests.get(f"{vlm_server.url}/models", timeout=10).status_code == 401
    cfg = tiny_config(**{"critique.backend": "openai", "critique.base_url": vlm_server.url})
    endpoint = Endpoint(vlm_server.url, vlm_server.key)
    summary = critique(cfg, images, str(tmp_path / "critique"), endpoint=endpoint)
    rows = rows_by_id(str(tmp_path / "critique"))
    assert_every_image_critiqued(rows, "openai")
    assert summary["ok"] == 6
    assert all(row["model"] == critic_model(cfg.critique) for row in rows.values() if row["status"] == "ok")


def test_unreachable_endpoint_fails_rows_without_hanging(ray_local, images, tmp_path):
    from tests.conftest import free_port

    dead = f"http://127.0.0.1:{free_port()}/v1"
    # max_failed_fraction 1: the rows fail and the stage completes (by default the stage would fail,
    # see tests/hostile/test_critic.py).
    cfg = tiny_config(**{"critique.backend": "openai", "critique.base_url": dead, "critique.max_retries": 1,
                         "critique.backoff_s": 0.1, "critique.timeout_s": 5,
                         "critique.max_failed_fraction": 1.0})  # fmt: skip
    summary = critique(cfg, images, str(tmp_path / "critique"))
    assert summary["failed"] == 8 and summary["ok"] == 0
    errors = {row["error"] for row in rows_by_id(str(tmp_path / "critique")).values()}
    assert any("endpoint unusable" in e for e in errors)


class FlakyEndpoint(BaseHTTPRequestHandler):
    """Answers 503 to the first `failures` chat requests, then a valid critique; counts requests."""

    failures = 2
    calls = 0

    def do_GET(self):  # /v1/models
        self._send(200, {"data": [{"id": "flaky"}]})

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        assert body["response_format"]["json_schema"]["schema"] == critique_schema()
        type(self).calls += 1
        if type(self).calls <= type(self).failures:
            return self._send(503, {"error": "overloaded"})
        url = body["messages"][0]["content"][0]["image_url"]["url"]
        import base64

        image = decode_image(base64.b64decode(url.split(",", 1)[1]))
        answer = json.dumps(heuristic_critique(image, "x"))
        self._send(200, {"choices": [{"message": {"content": answer}}]})

    def _send(self, status, payload):
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


def test_5xx_is_retried_with_backoff_then_succeeds(ray_local, images, tmp_path):
    server = ThreadingHTTPServer(("127.0.0.1", 0), FlakyEndpoint)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/v1"
        cfg = tiny_config(**{"critique.backend": "openai", "critique.base_url": url,
                             "critique.concurrency": 1,
                             "critique.backoff_s": 0.05, "critique.max_retries": 3})  # fmt: skip
        summary = critique(cfg, images, str(tmp_path / "critique"))
    finally:
        server.shutdown()
    assert summary["ok"] == 6 and summary["failed"] == 2
    assert FlakyEndpoint.calls == 6 + FlakyEndpoint.failures  # two 503s retried, then one call each
