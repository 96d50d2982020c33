"""Shared fixtures: one local Ray, one tiny model folder, one prompt set per test session."""

from __future__ import annotations

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
