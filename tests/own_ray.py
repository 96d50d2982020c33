"""Background pieces (tests/background.py) that start a Ray of their own, besides the loop's and the
job's: the simulated several-node cluster, and `artaug serve` on its private Ray stopped by SIGTERM."""

from __future__ import annotations

import dataclasses
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import requests

from tests.background import HEAVY
from tests.conftest import free_port

REPO = Path(__file__).resolve().parents[1]


def run_cluster_scenario(workdir: str, attempts: int = 3) -> tuple[int, str, float]:
    """tests/multinode_scenario.py in its own process (a process joins one Ray, and the session holds
    another): (exit status, stdout and stderr, seconds). A node that Ray gave up starting (its own fixed
    30 s wait for a raylet to register, missed on a loaded machine) is retried with a fresh cluster."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["PYTHONPATH"] = str(REPO)
    start = time.perf_counter()
    for attempt in range(attempts):
        folder = os.path.join(workdir, f"attempt-{attempt}")
        os.makedirs(folder)
        process = HEAVY.popen(
            [sys.executable, str(REPO / "tests" / "multinode_scenario.py"), folder],
            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )  # fmt: skip
        output, _ = process.communicate(timeout=600)
        try:  # what a failed start left of that cluster (its processes are in the scenario's group)
            os.killpg(process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        if "The current node timed out during startup" not in output:
            break
    return process.returncode, output, time.perf_counter() - start


@dataclasses.dataclass(frozen=True)
class StoppedServer:
    """What `serve_then_sigterm` saw; tests/test_serve_cli.py asserts on it."""

    returncode: int
    output: str  # the server's console
    ray_side: list[psutil.Process]  # the processes it had started (Ray's among them) while serving
    ray_side_names: set[str]  # their names then (a process that has exited has none)


def serve_then_sigterm(log_path: str) -> StoppedServer:
    """`artaug serve` (the default world model, on its own local Ray), healthy, then SIGTERM."""
    port = free_port()
    with open(log_path, "w") as log_file:  # a file, not a pipe: Ray's log lines never block the server
        server = HEAVY.popen(  # its own process group, which the Ray it starts joins
            [sys.executable, "-m", "artaug.cli", "serve", "--port", str(port)],
            stdout=log_file,
            stderr=subprocess.STDOUT,
        )
    try:
        deadline = time.monotonic() + 300
        while True:
            assert server.poll() is None, Path(log_path).read_text()[-4000:]
            assert time.monotonic() < deadline, (
                "not healthy within 300 s:\n" + Path(log_path).read_text()[-4000:]
            )
            try:
                if requests.get(f"http://127.0.0.1:{port}/healthz", timeout=10).status_code == 200:
                    break
            except requests.RequestException:  # not listening yet, or the app still deploying
                pass
            time.sleep(0.5)
        ray_side = family_of(server.pid)
        names = set()
        for process in ray_side:
            try:
                names.add(process.name())
            except psutil.NoSuchProcess:  # a worker that had just exited
                pass
        server.send_signal(signal.SIGTERM)
        server.wait(timeout=120)
    finally:
        if server.poll() is None:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()
    return StoppedServer(server.returncode, Path(log_path).read_text(), ray_side, names)


def family_of(pid: int) -> list[psutil.Process]:
    """The processes `pid` started: its descendants and everything else in its process group (Ray's
    GCS, raylet and workers join the group of the driver that starts a local Ray)."""
    family = {p.pid: p for p in psutil.Process(pid).children(recursive=True)}
    for process in psutil.process_iter():
        try:
            if process.pid != pid and os.getpgid(process.pid) == pid:
                family.setdefault(process.pid, process)
        except (OSError, psutil.Error):
            continue
    return list(family.values())


def still_running(processes: list[psutil.Process]) -> list[psutil.Process]:
    """Those still running (not the same pid reused, not a zombie waiting to be reaped)."""
    running = []
    for process in processes:
        try:
            if process.is_running() and process.status() != psutil.STATUS_ZOMBIE:
                running.append(process)
        except psutil.NoSuchProcess:
            continue
    return running
