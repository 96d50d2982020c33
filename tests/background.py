"""Heavy work that starts with the session and runs beside the in-process tests.

A whole `artaug run`, a submitted job, a simulated cluster: each starts its own processes and its own
Ray, and waits for them to start. Run in a background thread, one piece at a time, beside the
in-process tests, they fill the CPU time both leave idle: on 2 cores the suite went from 25% idle to
about 5% and took 18% less time, each side running slower (docs/platform.md). A test that asserts on a
piece waits for its result; a piece's failure is raised in every test that waits for it.

conftest.py starts the pieces the collected tests need before the first test and moves those tests to
the end of the session, by which time their pieces are usually done.
"""

from __future__ import annotations

import concurrent.futures
import os
import signal
import subprocess
import time
from collections.abc import Callable


class Background:
    """Pieces of heavy work run one after another in one thread; their processes are tracked so that an
    interrupted session (Ctrl-C, `-x`) does not leave them running."""

    def __init__(self) -> None:
        self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="heavy")
        self._processes: list[subprocess.Popen] = []
        self._closing = False
        self.timings: list[tuple[str, float, str]] = []  # (piece, seconds, "ok" or the error's type)

    def submit(self, name: str, piece: Callable, *args) -> concurrent.futures.Future:
        def timed():
            start = time.perf_counter()
            outcome = "ok"
            try:
                return piece(*args)
            except BaseException as error:
                outcome = type(error).__name__
                raise
            finally:
                self.timings.append((name, time.perf_counter() - start, outcome))

        return self._pool.submit(timed)

    def popen(self, args: list[str], **kwargs) -> subprocess.Popen:
        """subprocess.Popen in a new process group (the Ray it starts joins it), killed whole by close()."""
        if self._closing:  # a piece that goes on after close() killed its last process starts nothing
            raise RuntimeError("the test session is ending")
        process = subprocess.Popen(args, **{"start_new_session": True, **kwargs})
        self._processes.append(process)
        return process

    def close(self) -> None:
        """Cancel the pieces not started and kill the process groups of the one still running."""
        self._closing = True
        self._pool.shutdown(wait=False, cancel_futures=True)
        for process in self._processes:
            if process.poll() is None:
                try:
                    os.killpg(process.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        self._pool.shutdown(wait=True)


HEAVY = Background()
