"""`ray job submit` against a real local Ray head, as a user submits to a cluster: the background piece
(tests/background.py) that tests/test_jobs.py asserts on.

The head is the piece's own: its own temp dir, ports and auth token, started with `ray start --head
--block` in a new process group and stopped by signalling that group (never `ray stop`, which stops
every Ray on the machine). The job writes to the moto S3 server on loopback; a made-up HF_TOKEN in
the head's environment (as on a real node) must reach the job without ever being written anywhere.
"""

from __future__ import annotations

import dataclasses
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import requests

from artaug import storage
from tests.background import HEAVY
from tests.conftest import free_port

REPO = Path(__file__).resolve().parents[1]
RAY = str(Path(sys.executable).with_name("ray"))


class LocalHead:
    """A Ray head in its own process group, temp dir and ports; stop() ends exactly its processes."""

    def __init__(self, env: dict):
        # Short: Ray's Unix socket paths live under it and are limited to ~107 characters.
        self.temp_dir = tempfile.mkdtemp(prefix="artaug-job-", dir="/tmp")
        low = free_port()  # workers take ports from [low, low + 200): no other component may
        taken = set(range(low, low + 201))

        def port() -> int:
            while (chosen := free_port()) in taken:
                pass
            taken.add(chosen)
            return chosen

        self.dashboard_port = port()
        ports = {
            "--port": port(),
            "--dashboard-port": self.dashboard_port,
            "--ray-client-server-port": port(),
            "--node-manager-port": port(),
            "--object-manager-port": port(),
            "--metrics-export-port": port(),
            "--dashboard-agent-listen-port": port(),
            "--dashboard-agent-grpc-port": port(),
            "--runtime-env-agent-port": port(),
        }
        command = [RAY, "start", "--head", "--block", "--disable-usage-stats", f"--temp-dir={self.temp_dir}",
                   "--num-cpus=4", "--num-gpus=0", "--object-store-memory=500000000",
                   "--include-dashboard=true", "--dashboard-host=127.0.0.1",
                   f"--min-worker-port={low}", f"--max-worker-port={low + 200}",
                   *(f"{flag}={port}" for flag, port in ports.items())]  # fmt: skip
        self.log = open(os.path.join(self.temp_dir, "head.out"), "w")  # noqa: SIM115 - closed in stop()
        self.process = HEAVY.popen(command, env=env, stdout=self.log, stderr=subprocess.STDOUT)
        self.address = f"http://127.0.0.1:{self.dashboard_port}"

    def wait_ready(self, token: str, timeout_s: float = 180) -> None:
        """Until the job server lists jobs for the token's holder. Asked over HTTP, as `ray job list`
        asks it: a `ray job list` process every poll took CPU from the head's own start on 2 cores."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"ray start exited: {Path(self.log.name).read_text()[-2000:]}")
            try:
                auth = {"Authorization": f"Bearer {token}"}
                answer = requests.get(f"{self.address}/api/jobs/", headers=auth, timeout=10)
                listed = answer.status_code == 200
            except requests.RequestException:
                listed = False
            if listed and "Ray runtime started" in Path(self.log.name).read_text():
                return
            time.sleep(1)
        raise TimeoutError("the Ray head's job server did not come up")

    def stop(self) -> None:
        """SIGTERM to the head's process group, SIGKILL to what is left of it after 20 s."""
        group = self.process.pid  # start_new_session: the group id is the leader's pid
        for sig, wait_s in ((signal.SIGTERM, 20), (signal.SIGKILL, 0)):
            try:
                os.killpg(group, sig)
            except ProcessLookupError:  # the whole group is gone already
                break
            try:
                self.process.wait(timeout=wait_s or None)
            except subprocess.TimeoutExpired:
                pass
        self.process.wait(timeout=10)
        self.log.close()


def start_head(node_env: dict, attempts: int = 3) -> LocalHead:
    """A ready head; a start that times out (Ray's own 30 s limits, on a loaded machine) is retried."""
    for attempt in range(attempts):
        head = LocalHead(node_env)
        try:
            head.wait_ready(node_env["RAY_AUTH_TOKEN"])
            return head
        except (RuntimeError, TimeoutError):
            head.stop()
            shutil.rmtree(head.temp_dir, ignore_errors=True)
            if attempt == attempts - 1:
                raise
    raise AssertionError("unreachable")


@dataclasses.dataclass(frozen=True)
class SubmittedJob:
    """What `submit_world_job` saw; tests/test_jobs.py asserts on it."""

    out: str  # the run directory on S3
    hf_token: str  # the made-up token in the head's environment
    returncode: int  # of `ray job submit`
    output: str  # its stdout and stderr: the job's logs
    listing: str  # `ray job list`
    seconds: float  # submit to finish
    status_without_token: int  # the job server's answer to a request without the token
    head_logs: str  # the head's temp dir: Ray's own logs


def submit_world_job(s3_bucket: str) -> SubmittedJob:
    """jobs/world.yaml on two prompts from S3, submitted with `ray job submit`, writing to S3."""
    hf_token = "hf_" + secrets.token_hex(16)
    auth = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32)}
    base = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "RAY_ADDRESS")}
    # The node's environment: the venv's python first (as the image's), the token, S3 settings.
    node_env = base | auth | {"PATH": f"{Path(sys.executable).parent}:{base['PATH']}", "HF_TOKEN": hf_token}
    # On a loaded 2-core machine the dashboard agent can take a minute to start: the raylet waits.
    node_env |= {"RAY_agent_register_timeout_ms": "300000", "RAY_raylet_start_wait_time_s": "300"}
    client_env = base | auth
    storage.write_text(f"{s3_bucket}/job/prompts.txt", "a red circle on yellow\na black square on blue\n")
    out = f"{s3_bucket}/job/run-1"
    head = start_head(node_env)
    try:
        status_without_token = requests.get(f"{head.address}/api/jobs/", timeout=10).status_code
        start = time.perf_counter()
        submit = subprocess.run(
            [RAY, "job", "submit", "--address", head.address, "--working-dir", str(REPO),
             "--runtime-env", str(REPO / "jobs" / "runtime_env.yaml"), "--",
             "python", "-m", "artaug.cli", "run", "--config", "jobs/world.yaml",
             "--set", f"prompts={s3_bucket}/job/prompts.txt", "--out", out],
            env=client_env, capture_output=True, text=True, timeout=900, cwd=REPO,
        )  # fmt: skip
        seconds = time.perf_counter() - start
        jobs = subprocess.run([RAY, "job", "list", "--address", head.address], env=client_env,
                              capture_output=True, text=True, timeout=60)  # fmt: skip
    finally:
        head.stop()
    return SubmittedJob(
        out=out,
        hf_token=hf_token,
        returncode=submit.returncode,
        output=submit.stdout + submit.stderr,
        listing=jobs.stdout,
        seconds=seconds,
        status_without_token=status_without_token,
        head_logs=head.temp_dir,
    )
