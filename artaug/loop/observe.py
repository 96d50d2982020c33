"""Observability of a run: log lines keyed by run, round and stage, and stage metrics through Ray.

Metrics go through Ray's metrics API, so they appear on the Ray dashboard and at every node's
Prometheus endpoint (`ray_artaug_stage_*` series, tagged run / round / stage).
"""

from __future__ import annotations

import contextlib
import contextvars
import logging

from ray.util.metrics import Counter, Gauge

_context: contextvars.ContextVar[str] = contextvars.ContextVar("artaug_log_context", default="")
_metrics: dict | None = None

METRIC_NAMES = (
    "artaug_stage_rows", "artaug_stage_errors", "artaug_stage_seconds", "artaug_stage_images_per_s",
)  # fmt: skip


class ContextFilter(logging.Filter):
    """Adds `context` ("run=... round=... stage=...") to every record, for the log format."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.context = _context.get()
        return True


LOG_FORMAT = "%(asctime)s %(levelname)s [%(context)s] %(name)s: %(message)s"


def install_log_context(log_file: str | None = None) -> None:
    """Key every artaug log line by run/round/stage; also write them to `log_file` when given."""
    root = logging.getLogger()
    handlers = list(root.handlers)
    if log_file:
        handler = logging.FileHandler(log_file)
        root.addHandler(handler)
        handlers.append(handler)
    for handler in handlers:
        if not any(isinstance(f, ContextFilter) for f in handler.filters):
            handler.addFilter(ContextFilter())
        handler.setFormatter(logging.Formatter(LOG_FORMAT))


@contextlib.contextmanager
def log_context(**keys):
    """Within the block, log lines carry these keys (added to the enclosing ones)."""
    outer = _context.get()
    inner = " ".join(f"{k}={v}" for k, v in keys.items() if v is not None)
    token = _context.set(f"{outer} {inner}".strip())
    try:
        yield
    finally:
        _context.reset(token)


def _ray_metrics() -> dict:
    global _metrics
    if _metrics is None:
        tags = ("run", "round", "stage")
        _metrics = {
            "rows": Counter(METRIC_NAMES[0], "Rows a stage wrote.", tags),
            "errors": Counter(METRIC_NAMES[1], "Rows a stage wrote with an error.", tags),
            "seconds": Gauge(METRIC_NAMES[2], "Wall-clock seconds of the stage's last run.", tags),
            "images_per_s": Gauge(METRIC_NAMES[3], "Images per second of the stage's last run.", tags),
        }
    return _metrics


def record_stage(run: str, round_index: int | str, stage: str, summary: dict) -> None:
    """Export a finished stage's rows, errors, seconds and images/s as Ray metrics."""
    metrics = _ray_metrics()
    tags = {"run": run, "round": str(round_index), "stage": stage}
    rows = summary.get("rows") or 0
    seconds = summary.get("seconds") or 0.0
    errors = summary.get("errors") or summary.get("failed") or 0
    for name, value in (("rows", rows), ("errors", errors)):
        if value:  # Ray's counters take positive increments only
            metrics[name].inc(float(value), tags)
    metrics["seconds"].set(float(seconds), tags)
    if stage in ("generate", "enhance") and seconds:
        metrics["images_per_s"].set(rows / seconds, tags)
