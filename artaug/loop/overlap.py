"""Stages of a round that overlap where the data allows: a stage reads the parts of the stage before
it while that one still writes them (`artaug.stages.parts.follow`).

- The critique starts on generate's first parts where its critic is up already: the run's warm
  engine, or a backend without an engine (a per-stage vLLM engine would start once per batch).
- The latent cache of the round's training fills while the filter writes its verdicts, where the
  synthesis hosts (the cache's encoders) and the scorer hosts (the filter's) can be up at once; a
  round the filter stops does not keep it. A cache that fails here is left to the train stage.
- The judge's engine loads while the evaluation generates (`Loop._judge_engine`).

Only with `loop.overlap_stages` (off by default: on one small machine the two stages only contend
for its cores; on in the flux-dev preset). The earlier stage runs in a daemon thread (`Background`),
the later one in the loop's thread. A failure of the earlier stage is raised
first (it is the cause); an interrupt does not wait for it.
"""

from __future__ import annotations

import contextvars
import logging
import threading
import time
from collections.abc import Callable

from artaug import storage
from artaug.config import RunConfig
from artaug.layout import RoundLayout
from artaug.stages.hosts import Hosts, hosts_coexist
from artaug.stages.parts import WriterStoppedError
from artaug.stages.train import encode_pairs

log = logging.getLogger(__name__)


class Background:
    """A stage run in a daemon thread (with the caller's log context): `artaug.stages.parts.Writer`."""

    def __init__(self, work: Callable[[], dict]):
        self.started = time.time()  # a follower reads parts recorded since then as they land
        self._summary: dict | None = None
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=contextvars.copy_context().run, args=(self._run, work),
                                        name="artaug-background-stage", daemon=True)  # fmt: skip
        self._thread.start()

    def _run(self, work: Callable[[], dict]) -> None:
        try:
            self._summary = work()
        except BaseException as err:  # noqa: BLE001 - re-raised in the loop's thread by result()
            self._error = err

    def running(self) -> bool:
        return self._thread.is_alive()

    def result(self) -> dict:
        """The stage's summary once it ended; its error, re-raised, if it failed."""
        self._thread.join()
        if self._error is not None:
            raise self._error
        return self._summary


def overlapped(writing: Callable[[], dict], following: Callable[[Background | None], object],
               overlap: bool) -> dict:  # fmt: skip
    """Run the stage `writing` in the background and `following(writer)` here, reading its parts
    as they land; without `overlap`, `writing` and then `following(None)`. Returns `writing`'s
    summary."""
    if not overlap:
        summary = writing()
        following(None)
        return summary
    writer = Background(writing)
    try:
        following(writer)
    except Exception:
        writer.result()  # a failed writer is the cause: its error comes first
        raise
    return writer.result()


def critique_follows(cfg: RunConfig, warm_engine: bool) -> bool:
    """The critique can start on generate's first parts: its critic is up already, or needs no engine."""
    return cfg.loop.overlap_stages and (warm_engine or cfg.critique.backend != "vllm")


def caches_early(cfg: RunConfig, round_dir: RoundLayout) -> bool:
    """The round's latent cache can fill while its filter runs: the filter and training still have
    to run, and the synthesis and scorer hosts can be up at once."""
    pending = not any(storage.is_complete(round_dir.stage(name)) for name in ("filter", "train"))
    return cfg.loop.overlap_stages and pending and hosts_coexist(cfg)


class EarlyCache:
    """`following` for the filter: the round's latent cache, encoded as the filter's parts land."""

    def __init__(self, cfg: RunConfig, round_dir: RoundLayout, hosts: Hosts):
        self.cfg, self.round_dir, self.hosts = cfg, round_dir, hosts
        self.summary: dict | None = None

    def __call__(self, writer: Background | None) -> None:
        if writer is None:
            return
        latents = self.round_dir.train.latents
        try:
            self.summary = encode_pairs(self.cfg, self.round_dir.stage("filter"), latents, self.hosts, writer)
        except WriterStoppedError:
            storage.remove_tree(latents)  # the filter failed: `overlapped` raises its error
        except Exception as err:  # noqa: BLE001 - the train stage encodes the pairs itself
            log.warning("the latent cache could not be encoded while the filter ran (%s): the train"
                        " stage encodes it", err)  # fmt: skip
            storage.remove_tree(latents)

    def discard(self) -> None:
        """The round stops before training: its cache is not kept."""
        if self.summary is not None:
            storage.remove_tree(self.round_dir.stage("train"))
            self.summary = None
