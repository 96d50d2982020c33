"""Shared fixtures: one local Ray, one tiny model folder, one prompt set, one vLLM server per test session,
and the heavy work that runs beside the tests (tests/background.py)."""

from __future__ import annotations

import dataclasses
import os
import socket


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# s3:// in tests means a moto server on loopback (started by the `s3_bucket` fixture). These are set
# before Ray starts so its workers see them too; nothing can reach a real cloud from a test.
S3_PORT = free_port()
os.environ.update(
    AWS_ENDPOINT_URL=f"http://127.0.0.1:{S3_PORT}",
    AWS_ACCESS_KEY_ID="testing",
    AWS_SECRET_ACCESS_KEY="testing",
    AWS_DEFAULT_REGION="us-east-1",
    AWS_EC2_METADATA_DISABLED="true",
)

# Two cores are shared by the test process and Ray's workers: one thread each.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")
# The key of the session's vLLM server (`vlm_server`), set before any Ray starts: the openai backend
# reads it from the environment of the Ray worker that asks.
os.environ["ARTAUG_TEST_VLM_KEY"] = "test-critic-key"

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)


@pytest.fixture(scope="session")
def ray_local():
    """A private local Ray for the whole session (4 logical CPUs so actors do not starve)."""
    import ray

    from artaug.cluster import init_ray
    from artaug.config import RayConfig

    init_ray(RayConfig(num_cpus=4, object_store_gb=1.0))
    yield ray
    ray.shutdown()


@dataclasses.dataclass(frozen=True)
class VlmServer:
    """The session's vLLM server: its /v1 URL, the model name it serves, and the environment variable
    that holds its key (set at the top of this file, so Ray's workers and `artaug` processes have it)."""

    url: str
    model: str
    key_env: str = "ARTAUG_TEST_VLM_KEY"

    @property
    def key(self) -> str:
        return os.environ[self.key_env]

    def judge_settings(self) -> list[str]:
        """`section.field=value` settings that send a run's judge to this server."""
        return [
            "evaluate.judge_backend=openai", f"evaluate.judge_base_url={self.url}",
            f"evaluate.judge_model={self.model}", f"critique.api_key_env={self.key_env}",
        ]  # fmt: skip


@pytest.fixture(scope="session")
def vlm_server(tmp_path_factory):
    """One real vLLM OpenAI-compatible server on the tiny VLM for the whole session, as `artaug critic
    serve` starts it: the openai critic tests and the runs' judges talk to it, so the session starts one
    engine for all of them (tests of the in-run engine and of ray.data.llm start their own)."""
    from artaug.critic.backends import critic_model
    from artaug.critic.server import start_server, stop_server, wait_ready

    cfg = tiny_config().critique
    server = VlmServer(url="", model=critic_model(cfg))
    log = str(tmp_path_factory.mktemp("vlm-server") / "server.log")
    process, url = start_server(server.model, cfg, port=free_port(), log_path=log, api_key=server.key)
    try:
        wait_ready(process, url, timeout_s=600, log_path=log)
        yield dataclasses.replace(server, url=url)
    finally:
        stop_server(process)


@pytest.fixture(scope="session")
def s3_bucket(tmp_path_factory):
    """An empty bucket on a local S3-compatible server; yields its s3:// URI.

    The server runs in its own process: in this one, its threads would take the test process's GIL
    while Ray workers upload, and count in the heap measurements of tests running meanwhile."""
    import subprocess
    import sys
    import time

    import boto3

    log = open(tmp_path_factory.mktemp("s3") / "moto.log", "wb")
    command = [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(S3_PORT)]
    server = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 60
    while True:
        try:
            socket.create_connection(("127.0.0.1", S3_PORT), timeout=1).close()
            break
        except OSError:
            if server.poll() is not None or time.monotonic() > deadline:
                server.kill()
                raise RuntimeError(f"the S3 test server did not start; see {log.name}") from None
            time.sleep(0.2)
    boto3.client("s3").create_bucket(Bucket="artaug-test")
    yield "s3://artaug-test"
    server.terminate()
    server.wait(timeout=30)
    log.close()


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory) -> str:
    """The tiny FLUX pipeline saved with save_pretrained, as `artaug models build-tiny` does."""
    from artaug.models.tiny import save_tiny_flux

    return save_tiny_flux(str(tmp_path_factory.mktemp("tiny-flux")), seed=0)


@pytest.fixture(scope="session")
def prompt_file(tmp_path_factory) -> str:
    """20 prompts, two blank lines among them."""
    path = tmp_path_factory.mktemp("prompts") / "prompts.txt"
    lines = [f"a watercolour painting of house number {i}" for i in range(20)]
    lines.insert(5, "")
    lines.insert(12, "   ")
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def tiny_config(**overrides):
    """The tiny preset with `section.field=value` overrides (e.g. generate.num_actors=1)."""
    from artaug.config import load_config

    return load_config("tiny", overrides=[f"{k}={v}" for k, v in overrides.items()])


def world_config(**overrides):
    """The world preset (the miniature world, the commands' default) with `section.field=value` overrides."""
    from artaug.config import load_config

    return load_config("world", overrides=[f"{k}={v}" for k, v in overrides.items()])


# ------------------------------------------------------------------ heavy work beside the other tests

# Pieces that start their own processes and Ray (tests/background.py), in the order they run: each is
# started before the first test if a collected test needs it, and those tests run last.
STARTED_EARLY = (
    "submitted_job_started",  # tests/job_runs.py: needs no vLLM server, so it runs while ours starts
    "finished_run_started",  # tests/loop_runs.py: the shared CI-sized run
    "resume_drill_started",  # tests/loop_runs.py: a copy of its round 1, resumed, killed, resumed
    "simulated_cluster_started",  # tests/own_ray.py
    "stopped_server_started",  # tests/own_ray.py
    "real_shapes_started",  # tests/real_shapes_run.py: FLUX.1-dev's widths through the stages
)


def _first_piece(item) -> int:
    """The position in STARTED_EARLY of the first piece `item` waits for; -1 if none."""
    return min((STARTED_EARLY.index(n) for n in item.fixturenames if n in STARTED_EARLY), default=-1)


def pytest_collection_modifyitems(items):
    """Tests that wait for a background piece run after all others, in the pieces' order. Their own
    time limit covers the wait: the pieces have theirs (a run's, a job's timeout)."""
    items.sort(key=_first_piece)
    for item in items:
        if _first_piece(item) >= 0:
            item.add_marker(pytest.mark.timeout(3600), append=False)


def pytest_terminal_summary(terminalreporter):
    from tests.background import HEAVY

    if HEAVY.timings:
        terminalreporter.section("heavy work run beside the tests (tests/background.py)")
        for name, seconds, outcome in HEAVY.timings:
            terminalreporter.write_line(f"{seconds:8.1f} s  {name}  ({outcome})")


@pytest.fixture(scope="session", autouse=True)
def start_heavy_work(request):
    """Start, before the first test, every background piece that a collected test waits for. A piece
    that cannot start fails the tests that wait for it (pytest raises its error again there), no other."""
    needed = {name for item in request.session.items for name in item.fixturenames}
    for name in STARTED_EARLY:
        if name in needed:
            try:
                request.getfixturevalue(name)
            except Exception:  # noqa: BLE001 - raised again in the tests that ask for it
                pass


@pytest.fixture(scope="session")
def heavy():
    """The background thread's pieces (tests/background.py); what is still running at the end is killed."""
    from tests.background import HEAVY

    yield HEAVY
    HEAVY.close()


@pytest.fixture(scope="session")
def submitted_job_started(heavy, s3_bucket):
    from tests.job_runs import submit_world_job

    return heavy.submit("the world loop as a submitted job", submit_world_job, s3_bucket)


@pytest.fixture(scope="session")
def submitted_job(submitted_job_started):
    """jobs/world.yaml submitted with `ray job submit` to a Ray head of its own (tests/job_runs.py)."""
    return submitted_job_started.result()


@pytest.fixture(scope="session")
def finished_run_started(heavy, vlm_server, tmp_path_factory):
    from tests.loop_runs import ci_sized_run

    run_dir = str(tmp_path_factory.mktemp("loop") / "run")
    return heavy.submit("the shared CI-sized run", ci_sized_run, run_dir, vlm_server.judge_settings())


@pytest.fixture(scope="session")
def finished_run(finished_run_started) -> tuple[str, str]:
    """One uninterrupted CI-sized `artaug run`: (run directory, its console output)."""
    return finished_run_started.result()


@pytest.fixture(scope="session")
def resume_drill_started(heavy, finished_run_started, tmp_path_factory):
    from tests.loop_runs import kill_and_resume

    folder = tmp_path_factory.mktemp("resume")

    def drill():  # after the shared run: one piece at a time
        reference, _ = finished_run_started.result()
        return kill_and_resume(reference, str(folder / "run"), str(folder / "killed-attempt.log"))

    return heavy.submit("the shared run's round 1 resumed, killed, resumed", drill)


@pytest.fixture(scope="session")
def resume_drill(resume_drill_started):
    """The shared run's round 1 copied, resumed, SIGKILLed in round 2, resumed (tests/loop_runs.py)."""
    return resume_drill_started.result()


@pytest.fixture(scope="session")
def simulated_cluster_started(heavy, tmp_path_factory):
    from tests.own_ray import run_cluster_scenario

    workdir = str(tmp_path_factory.mktemp("nodes"))
    return heavy.submit("the simulated several-node cluster", run_cluster_scenario, workdir)


@pytest.fixture(scope="session")
def simulated_cluster(simulated_cluster_started):
    """tests/multinode_scenario.py's (exit status, output, seconds) (tests/own_ray.py)."""
    return simulated_cluster_started.result()


@pytest.fixture(scope="session")
def stopped_server_started(heavy, tmp_path_factory):
    from tests.own_ray import serve_then_sigterm

    log = str(tmp_path_factory.mktemp("serve-sigterm") / "serve.log")
    return heavy.submit("artaug serve on its own Ray, stopped by SIGTERM", serve_then_sigterm, log)


@pytest.fixture(scope="session")
def stopped_server(stopped_server_started):
    """`artaug serve` on its own Ray, healthy, then SIGTERM (tests/own_ray.py)."""
    return stopped_server_started.result()


@pytest.fixture(scope="session")
def real_shapes_started(heavy, tmp_path_factory):
    from tests.real_shapes_run import run_in_background

    workdir = str(tmp_path_factory.mktemp("real-shapes"))
    return heavy.submit("FLUX.1-dev's shapes through the stages", run_in_background, workdir)


@pytest.fixture(scope="session")
def real_shapes(real_shapes_started) -> dict:
    """The flux-dev-shapes stages' folders and the served answer (tests/real_shapes_run.py)."""
    return real_shapes_started.result()


@pytest.fixture(scope="session")
def differential(ray_local, tmp_path_factory):
    """One differential `artaug train` on tests/pairs.py's pair set (tiny preset): its output folder
    and latent cache are read by the training tests of every mode (copy before writing)."""
    from artaug import storage
    from artaug.cli import main as cli
    from tests.pairs import pair_rows, write_pairs

    root = tmp_path_factory.mktemp("train-diff")
    pairs = write_pairs(str(root / "pairs"), pair_rows())
    out = str(root / "out")
    args = ["train", "--pairs", pairs, "--out", out, "--preset", "tiny"]  # the pairs are the tiny model's
    code = cli(args)
    return {"out": out, "pairs": pairs, "args": args, "code": code, "summary": storage.read_summary(out)}
