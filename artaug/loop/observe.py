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


@contextlib.contextmanager
def run_logging(log_file: str | None = None):
    """Within the block, every log line is keyed by run/round/stage and also written to `log_file`
    when given. On exit the handlers are as they were: a process may run several loops (a notebook,
    the tests), and one run's log file must not collect the next run's lines."""
    root = logging.getLogger()
    added = logging.FileHandler(log_file) if log_file else None
    if added is not None:
        root.addHandler(added)
    saved = [(handler, handler.formatter, list(handler.filters)) for handler in root.handlers]
    for handler in root.handlers:
        if not any(isinstance(f, ContextFilter) for f in handler.filters):
            handler.addFilter(ContextFilter())
        handler.setFormatter(logging.Formatter(LOG_FORMAT))
    try:
        yield
    finally:
        for handler, formatter, filters in saved:
            handler.setFormatter(formatter)
            handler.filters = filters
        if added is not None:
            root.removeHandler(added)
            added.close()


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


def pool_usage(manifest: dict) -> list[dict]:
    """Every pool that held workers for the run, from its manifest: the model hosts per role, the critic
    engines and each round's training workers, with seconds held, seconds busy and their ratio (busy
    means a call, a stage's requests or a training step was in progress): where a cluster idles."""
    pools = []
    for role, h in sorted((manifest.get("hosts") or {}).items()):
        detail = f"{h['hosts']} host(s), {sum(h['loads'].values())} model load(s), {h['calls']} calls"
        pools.append(_pool(f"{role} hosts", detail, h.get("held_s"), h.get("busy_s")))
    for engine in manifest.get("engines") or []:
        detail = f"{engine['model']}, {engine['restarts']} restart(s)"
        pools.append(_pool(f"{engine['role']} engine", detail, engine["held_s"], engine["busy_s"]))
    for k, stages in sorted((manifest.get("rounds") or {}).items(), key=lambda kv: int(kv[0])):
        train = stages.get("train") or {}
        if train.get("status") == "complete" and "busy_s" in train.get("metrics", {}):
            detail = f"{train['metrics']['steps']} steps"
            pools.append(_pool(f"round {k} training", detail, train["seconds"], train["metrics"]["busy_s"]))
    return pools


def _pool(name: str, detail: str, held_s: float | None, busy_s: float | None) -> dict:
    fraction = busy_s / held_s if held_s and busy_s is not None else None
    return {"pool": name, "detail": detail, "held_s": held_s, "busy_s": busy_s, "busy_fraction": fraction}
