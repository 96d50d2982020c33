"""What the image stages share inside an actor: batch rows that share settings, isolate failures."""

from __future__ import annotations

import logging
from collections.abc import Callable
from itertools import groupby

log = logging.getLogger(__name__)


def settings_key(row: dict) -> tuple:
    """Rows can share one sampling call when these are equal."""
    return (row["width"], row["height"], row["steps"], row["guidance"])


def run_in_groups(rows: list[dict], run: Callable[[list[dict]], list[dict]]) -> dict[str, dict]:
    """{prompt_id: result row} from `run` over groups of rows with equal settings.

    When a group raises, its rows are retried one by one so only the failing row becomes an error
    row (with the exception as its `error`) and the others finish.
    """
    done = {}
    for _, group in groupby(sorted(rows, key=settings_key), key=settings_key):
        for row in _isolating_failures(list(group), run):
            done[row["prompt_id"]] = row
    return done


def _isolating_failures(rows: list[dict], run) -> list[dict]:
    try:
        return run(rows)
    except Exception as err:  # noqa: BLE001 - any failure is confined to its row
        if len(rows) == 1:
            log.warning("prompt %s failed: %s", rows[0]["prompt_id"], err)
            return [{**rows[0], "error": f"{type(err).__name__}: {err}"}]
        return [out for row in rows for out in _isolating_failures([row], run)]
