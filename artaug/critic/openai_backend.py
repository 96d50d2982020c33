"""Critique through any OpenAI-compatible chat endpoint (a vLLM server, a hosted API).

The schema goes out as `response_format` json_schema, so a conforming server constrains decoding.
Requests run with bounded concurrency and a timeout each; connection errors, timeouts, broken
answers, 429 and 5xx are retried with exponential backoff a bounded number of times, then the row
becomes an error row. A dead endpoint trips a breaker: after `critique.breaker_failures` connection
failures in a row, the remaining rows fail at once instead of each costing retries x timeout. An
answer that is not a chat completion (HTML, a broken stream) is that row's error, never the stage's.

The key (a warm engine's own, else `critique.api_key_env`) goes only to the configured endpoint:
redirects are not followed, so no other host ever sees it. It is never logged or written.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import pyarrow as pa
import requests

from artaug.config import BUILT_IN_VLMS, CritiqueConfig
from artaug.critic.answers import answers_table

log = logging.getLogger(__name__)
RETRY_STATUS = {408, 409, 425, 429, 500, 502, 503, 504}


@dataclass(frozen=True)
class Endpoint:
    """An OpenAI-compatible base URL and its key (None: the key in critique.api_key_env)."""

    url: str
    key: str | None = field(default=None, repr=False)


class EndpointError(RuntimeError):
    """The endpoint refused or failed after every retry."""


class Breaker:
    """Counts connection failures in a row over all requests to one endpoint; any HTTP answer resets
    the count. Once `limit` is reached it stays open: the endpoint is taken for dead."""

    def __init__(self, limit: int):
        self.limit, self.failures, self._lock = limit, 0, threading.Lock()

    @property
    def open(self) -> bool:
        return self.failures >= self.limit

    def record(self, connected: bool) -> None:
        with self._lock:
            self.failures = 0 if connected else self.failures + 1


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


def chat_content(response: requests.Response) -> str:
    """The answer text of a 200 response, or EndpointError when it is not a chat completion."""
    try:
        content = response.json()["choices"][0]["message"]["content"]
    except (ValueError, KeyError, IndexError, TypeError, RecursionError) as err:
        raise EndpointError(
            f"HTTP 200 but not a chat completion ({type(err).__name__}): {response.text[:200]!r}"
        ) from None
    if content is not None and not isinstance(content, str):
        raise EndpointError(f"HTTP 200 but the message content is {type(content).__name__}, not text")
    return content or ""


class Client:
    """Requests to one endpoint with its key, retries and breaker."""

    def __init__(self, cfg: CritiqueConfig, endpoint: Endpoint):
        self.cfg, self.base_url = cfg, endpoint.url.rstrip("/")
        key = endpoint.key if endpoint.key is not None else os.environ.get(cfg.api_key_env, "")
        self.headers = {"Authorization": f"Bearer {key}"} if key else {}
        self.session = requests.Session()
        self.breaker = Breaker(cfg.breaker_failures)

    def get(self, path: str) -> requests.Response:
        return self._send("GET", path, None)

    def post(self, path: str, body: dict) -> requests.Response:
        return self._send("POST", path, body)

    def _send(self, method: str, path: str, body: dict | None) -> requests.Response:
        """The 200 response, or EndpointError once retries are spent (or at once, when it will not
        change: a refusal, a redirect, an open breaker)."""
        cfg, delay = self.cfg, self.cfg.backoff_s
        for attempt in range(cfg.max_retries + 1):
            if self.breaker.open:
                raise EndpointError(
                    f"endpoint {self.base_url} unreachable ({self.breaker.limit} connection failures"
                    " in a row); not asked"
                )
            try:
                response = self.session.request(method, self.base_url + path, json=body, headers=self.headers,
                                                timeout=cfg.timeout_s, allow_redirects=False)  # fmt: skip
            except (requests.ConnectionError, requests.Timeout) as err:
                self.breaker.record(False)
                problem = f"{type(err).__name__}: {err}"
            except requests.RequestException as err:  # the answer broke off mid-stream
                self.breaker.record(True)
                problem = f"broken answer: {type(err).__name__}: {err}"
            else:
                self.breaker.record(True)
                if response.status_code == 200:
                    return response
                if response.is_redirect:
                    where = response.headers.get("Location", "?")
                    raise EndpointError(f"HTTP {response.status_code}: redirect to {where} not followed")
                problem = f"HTTP {response.status_code}: {response.text[:300]}"
                if response.status_code not in RETRY_STATUS:
                    raise EndpointError(problem)  # a refusal (400, 401, 404, ...) will not change
            if attempt == cfg.max_retries:
                raise EndpointError(f"{problem} (after {cfg.max_retries} retries)")
            log.warning(
                "critic endpoint attempt %d failed (%s); retrying in %.1fs", attempt + 1, problem, delay
            )
            time.sleep(delay)
            delay *= 2
        raise AssertionError("unreachable")


def served_model(cfg: CritiqueConfig, client: Client) -> str:
    """The model name to ask for: config model, or the endpoint's only model for built-in/local ones."""
    if cfg.model not in BUILT_IN_VLMS and not os.path.exists(os.path.expanduser(cfg.model)):
        return cfg.model
    try:
        return client.get("/models").json()["data"][0]["id"]
    except (ValueError, KeyError, IndexError, TypeError, RecursionError) as err:
        raise EndpointError(f"GET /models answered no model list ({type(err).__name__})") from None


class OpenAICritic:
    """Ray Data callable: batches of request rows in, rows with `raw` answers (or errors) out.

    `task` (artaug.critic.backends.Task) says what to ask; `endpoint` is where.
    """

    def __init__(self, cfg: CritiqueConfig, task, endpoint: Endpoint):
        self.cfg, self.task = cfg, task
        self.client = Client(cfg, endpoint)
        self.model = None

    def __call__(self, batch: pa.Table) -> pa.Table:
        rows = batch.to_pylist()
        try:
            self.model = self.model or served_model(self.cfg, self.client)
        except EndpointError as err:
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
                chat_content(self.client.post("/chat/completions", body)),
                None,
                time.perf_counter() - start,
            )
        except EndpointError as err:
            return None, str(err), time.perf_counter() - start
