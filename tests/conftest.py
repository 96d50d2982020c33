"""Shared fixtures: one local Ray, one tiny model folder, one prompt set per test session."""

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
def s3_bucket():
    """An empty bucket on a local S3-compatible server; yields its s3:// URI."""
    import boto3
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=S3_PORT, verbose=False)
    server.start()
    boto3.client("s3").create_bucket(Bucket="artaug-test")
    yield "s3://artaug-test"
    server.stop()


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
