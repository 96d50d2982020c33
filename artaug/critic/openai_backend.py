"""Critique through any OpenAI-compatible chat endpoint (a vLLM server, a hosted API).

The schema goes out as `response_format` json_schema, so a conforming server constrains decoding.
Requests run with bounded concurrency and a timeout each; connection errors, timeouts, 429 and 5xx
are retried with exponential backoff a bounded number of times, then the row becomes an error row:
the stage never hangs on a dead endpoint. The API key comes from an environment variable and is
never logged or written.
"""

from __future__ import annotations

import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor

import pyarrow as pa
import requests

from artaug.config import CritiqueConfig
from artaug.critic.answers import answers_table

log = logging.getLogger(__name__)
RETRY_STATUS = {408, 409, 425, 429, 500, 502, 503, 504}


class EndpointError(RuntimeError):
    """The endpoint refused or failed after every retry."""


def request_body(cfg: CritiqueConfig, model: str, messages: list[dict], schema: dict, name: str) -> dict:
    """A chat completion request whose answer the server must constrain to `schema`."""
    return {
        "model": model,
        "messages": messages,
        "max_tokens": cfg.max_tokens,
        "temperature": cfg.temperature,
        "response_format": {
            "type": "json_schema",
            "json_schema": {"name": name, "schema": schema, "strict": True},
        },
    }


def post_with_retries(session: requests.Session, url: str, body: dict, cfg: CritiqueConfig) -> str:
    """The answer text, or EndpointError once retries are spent."""
    key = os.environ.get(cfg.api_key_env, "")
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    delay = cfg.backoff_s
    for attempt in range(cfg.max_retries + 1):
        last = attempt == cfg.max_retries
        try:
            response = session.post(url, json=body, headers=headers, timeout=cfg.timeout_s)
        except (requests.ConnectionError, requests.Timeout) as err:
            problem = f"{type(err).__name__}: {err}"
        else:
            if response.status_code == 200:
                return response.json()["choices"][0]["message"]["content"] or ""
            problem = f"HTTP {response.status_code}: {response.text[:300]}"
            if response.status_code not in RETRY_STATUS:
                raise EndpointError(problem)  # a refusal (400, 401, 404, ...) will not change
        if last:
            raise EndpointError(f"{problem} (after {cfg.max_retries} retries)")
        log.warning("critic endpoint attempt %d failed (%s); retrying in %.1fs", attempt + 1, problem, delay)
        time.sleep(delay)
        delay *= 2
    raise AssertionError("unreachable")


def served_model(cfg: CritiqueConfig, session: requests.Session, base_url: str) -> str:
    """The model name to ask for: config model, or the endpoint's only model for "tiny"/local paths."""
    if cfg.model != "tiny" and not os.path.exists(os.path.expanduser(cfg.model)):
        return cfg.model
    response = session.get(base_url.rstrip("/") + "/models", timeout=cfg.timeout_s)
    response.raise_for_status()
    return response.json()["data"][0]["id"]


class OpenAICritic:
    """Ray Data callable: batches of request rows in, rows with `raw` answers (or errors) out.

    `task` (artaug.critic.backends.Task) says what to ask; `base_url` is the endpoint.
    """

    def __init__(self, cfg: CritiqueConfig, task, base_url: str):
        self.cfg, self.task, self.base_url = cfg, task, base_url
        self.session = requests.Session()
        self.url = base_url.rstrip("/") + "/chat/completions"
        self.model = None

    def __call__(self, batch: pa.Table) -> pa.Table:
        rows = batch.to_pylist()
        try:
            self.model = self.model or served_model(self.cfg, self.session, self.base_url)
        except (requests.RequestException, KeyError, IndexError, ValueError) as err:
            failed = [(None, f"endpoint unusable: {err}", 0.0)] * len(rows)
            return answers_table(rows, failed, self.cfg.model)
        with ThreadPoolExecutor(self.cfg.concurrency) as pool:
            results = list(pool.map(self._one, rows))
        return answers_table(rows, results, self.model)

    def _one(self, row: dict) -> tuple[str | None, str | None, float]:
        start = time.perf_counter()
        messages, schema = self.task.request(row)
        body = request_body(self.cfg, self.model, messages, schema, self.task.name)
        try:
            return (
                post_with_retries(self.session, self.url, body, self.cfg),
                None,
                time.perf_counter() - start,
            )
        except EndpointError as err:
            return None, str(err), time.perf_counter() - start
