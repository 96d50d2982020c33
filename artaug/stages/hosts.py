"""Warm model hosts: Ray actors that keep models loaded for a whole run, called from Ray Data.

A Ray Data actor pool dies with its dataset, so a pool per stage loads the synthesis model once per
stage per round. Here the models live in `ModelHost` actors owned by the run (or by one stage command
run alone), and the stages map thin Ray Data tasks over their rows (`map_on_hosts`) that hand each
batch to a host: Ray Data keeps the sharding, streaming and back-pressure; the hosts keep the models.

- A host runs any *work class*: `work(host=host, **kwargs)(batch) -> batch`, built per call (cheap)
  and taking its models from the host's cache (`ModelHost.cached`): the FLUX generator, the enhancer
  and the latent-cache encoder take the pipeline (whose LoRAs are set in place for the model each call
  asks for), the scorers theirs. The host imports no stage, so stages stay independent.
- CPUs: an idle host holds none (`num_cpus=0`); the task calling it holds the CPUs of the pool's
  `Resources` while its batch runs, so a warm host never starves training of CPUs. GPUs are held by
  the host for its life (the train stage releases GPU hosts after its latent cache, before Ray Train:
  `Hosts.release`). A pool that would wait for GPUs another pool holds on the same nodes (flux-dev:
  the scorers after the synthesis hosts took every GPU of the gpu group) releases that pool first
  (`Hosts.pool`).
- In flight: at most one calling task per host runs at once; `Router` hands each the host with
  the fewest calls running.
- Faults: a host that dies is restarted once and the call retried (it loads its models again);
  a row that fails inside a work class becomes that row's error, as before.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import pyarrow as pa
import ray

from artaug.cluster import gpus_for, label_selector, ray_resources
from artaug.config import Resources, RunConfig
from artaug.stages.contract import current_clock

log = logging.getLogger(__name__)


class ModelHost:
    """Holds models for its life and runs work classes on batches of rows."""

    def __init__(self, torch_threads: int):
        import torch  # here, not at import: the calling tasks never load torch

        torch.set_num_threads(torch_threads)
        self._cache: dict = {}
        self._born = time.monotonic()
        self._stats = {"pid": os.getpid(), "loads": {}, "calls": 0, "rows": 0, "busy_s": 0.0, "work": {}}
        self._first_calls: dict[str, float] = {}  # a stage attempt's tag -> when its first batch began

    def run(self, work: str, batch: pa.Table, clock_tag: str | None = None, **kwargs) -> pa.Table:
        """`work` ("module:Class", imported here so the calling tasks never import torch); `clock_tag`:
        the stage attempt this call belongs to (`artaug.stages.contract.StageClock`)."""
        start = time.perf_counter()
        module, _, name = work.partition(":")
        worker = getattr(importlib.import_module(module), name)(host=self, **kwargs)  # loads, sets LoRAs
        if clock_tag is not None:  # the models are ready: the batch's own work begins
            self._first_calls.setdefault(clock_tag, time.time())
        out = worker(batch)
        seconds = time.perf_counter() - start
        per_work = self._stats["work"].setdefault(name, {"calls": 0, "rows": 0, "busy_s": 0.0})
        for counters in (self._stats, per_work):
            counters["calls"] += 1
            counters["rows"] += batch.num_rows
            counters["busy_s"] += seconds
        return out

    def cached(self, kind: str, key: str, build: Callable):
        """The model `build()` made the first time (kind, key) was asked for; a build counts as a load."""
        if (kind, key) not in self._cache:
            self._cache[kind, key] = build()
            self._stats["loads"][kind] = self._stats["loads"].get(kind, 0) + 1
        return self._cache[kind, key]

    def count(self, name: str) -> None:
        self._stats[name] = self._stats.get(name, 0) + 1

    def stats(self) -> dict:
        return {**self._stats, "alive_s": time.monotonic() - self._born}

    def first_calls(self) -> dict[str, float]:
        return dict(self._first_calls)


class Router:
    """Actor: which host a calling task uses, the one with the fewest calls running. It never blocks:
    the number of calls in flight is bounded by the number of calling tasks (`map_on_hosts`), so a
    count left behind by a caller that died (its node lost) only skews the choice."""

    def __init__(self, hosts: int):
        self.running = [0] * hosts

    def acquire(self) -> int:
        index = self.running.index(min(self.running))
        self.running[index] += 1
        return index

    def release(self, index: int) -> None:
        self.running[index] = max(0, self.running[index] - 1)


@dataclass
class HostPool:
    """`size` ModelHost actors with one section's resources, and their router."""

    role: str
    resources: Resources
    size: int
    handles: list = field(default_factory=list)
    router: object = None
    # The hosts' first calls per clock tag, kept at `close`: a stage may ask after its hosts were released
    # (train releases GPU hosts after its latent cache, before Ray Train).
    closed_first_calls: dict[str, float] | None = None

    def __post_init__(self):
        options = ray_resources(self.resources)
        cpus = options.pop("num_cpus")
        self.call_cpus = cpus  # held by the calling task while a batch runs
        # A call waits while its host restarts (node lost, process killed): once per host per run.
        actor = ray.remote(ModelHost).options(num_cpus=0, max_restarts=1, max_task_retries=-1, **options)
        self.handles = [actor.remote(self.resources.torch_threads) for _ in range(self.size)]
        router = ray.remote(Router).options(num_cpus=0, max_restarts=-1, max_task_retries=-1)
        self.router = router.remote(self.size)  # its counts only steer: a restarted one starts at 0

    def stats(self) -> list[dict]:
        """Every host's counters; a host that is gone counts as lost (nothing loaded, no calls)."""
        out = []
        for handle in self.handles:
            try:
                out.append(ray.get(handle.stats.remote(), timeout=60))
            except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError):
                out.append({"pid": None, "loads": {}, "calls": 0, "rows": 0, "busy_s": 0.0, "alive_s": 0.0,
                            "work": {}})  # fmt: skip
        return out

    def first_call(self, clock_tag: str) -> float | None:
        """When a host of this pool, its models ready, first began a batch tagged `clock_tag` (epoch);
        None if none did."""
        if self.closed_first_calls is not None:
            return self.closed_first_calls.get(clock_tag)
        return self._first_calls().get(clock_tag)

    def _first_calls(self) -> dict[str, float]:
        """Per clock tag, the earliest first call over the hosts that answer."""
        earliest: dict[str, float] = {}
        for handle in self.handles:
            with contextlib.suppress(ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError):
                for tag, when in ray.get(handle.first_calls.remote(), timeout=60).items():
                    earliest[tag] = min(when, earliest.get(tag, when))
        return earliest

    def close(self) -> None:
        if self.closed_first_calls is None:  # a second close keeps what the first one read
            self.closed_first_calls = self._first_calls()
        for handle in [*self.handles, self.router]:
            ray.kill(handle)
        self.handles = []


def call_host(batch: pa.Table, pool: HostPool, work: str, kwargs: dict, clock_tag: str | None) -> pa.Table:
    """Ray Data task: run `work` on one batch on the least busy host of `pool`."""
    index = ray.get(pool.router.acquire.remote())
    try:
        for attempt in range(60):  # a host restarting answers "unavailable" for a while
            try:
                return ray.get(pool.handles[index].run.remote(work, batch, clock_tag, **kwargs))
            except ray.exceptions.ActorUnavailableError:
                if attempt == 59:
                    raise
                time.sleep(5)
    finally:
        pool.router.release.remote(index)


def map_on_hosts(ds: ray.data.Dataset, pool: HostPool, work: type, kwargs: dict, batch_size: int):
    """`ds` with `work` applied to every batch on the pool's hosts (Ray Data tasks as callers); the
    running stage's clock learns when the first batch began on a host."""
    clock = current_clock()
    if clock is not None:
        clock.probes.append(functools.partial(pool.first_call, clock.tag))
    return ds.map_batches(
        call_host,
        fn_kwargs={
            "pool": pool,
            "work": f"{work.__module__}:{work.__qualname__}",
            "kwargs": kwargs,
            "clock_tag": clock and clock.tag,
        },
        batch_size=batch_size,
        batch_format="pyarrow",
        compute=ray.data.TaskPoolStrategy(size=pool.size),
        num_cpus=pool.call_cpus,
    )


@dataclass
class Hosts:
    """The warm hosts of a run: FLUX (generate, enhance, the evaluation's generations) and scorers
    (filter, evaluate). A pool is started on first use and lives until `close` (or `release`)."""

    cfg: RunConfig
    pools: dict[str, HostPool] = field(default_factory=dict)
    closed_stats: dict[str, list[dict]] = field(default_factory=dict)
    # Overlapping stages (artaug.loop.overlap) ask for their pools from two threads: one starts each.
    _lock: threading.RLock = field(default_factory=threading.RLock, repr=False)

    def pool(self, role: str) -> HostPool:
        with self._lock:
            if role not in self.pools:
                section = self.cfg.generate if role == "synthesis" else self.cfg.scorers
                self._make_room(section.resources, section.num_actors)
                self.pools[role] = HostPool(role, section.resources, section.num_actors)
            return self.pools[role]

    def _make_room(self, resources: Resources, size: int) -> None:
        """Release the pools holding GPUs this new pool needs: with both, the nodes its labels select
        would have fewer GPUs than asked for (Ray would leave the new hosts pending for ever). Counts
        the nodes alive now: under an autoscaler that may add more, the pools take turns."""
        need = gpus_for(resources) * size
        rivals = [r for r, p in self.pools.items() if need > 0 and share_gpus(p.resources, resources)]
        held = sum(gpus_for(self.pools[r].resources) * self.pools[r].size for r in rivals)
        if rivals and held + need > gpus_on_nodes(resources.node_labels):
            log.info("releasing the %s hosts: the new hosts need the GPUs they hold", ", ".join(rivals))
            self.release(tuple(rivals))

    def stats(self) -> dict[str, list[dict]]:
        """Per role, every host's counters (pid, loads per model kind, calls, rows, busy seconds)."""
        with self._lock:
            live = {role: pool.stats() for role, pool in self.pools.items()}
        return {role: [*self.closed_stats.get(role, []), *live.get(role, [])]
                for role in {*live, *self.closed_stats}}  # fmt: skip

    def release(self, roles: tuple[str, ...] = ("synthesis", "scorers")) -> None:
        """Stop these pools (their counters are kept); the next `pool(role)` starts new hosts."""
        with self._lock:
            self._release(roles)

    def _release(self, roles: tuple[str, ...]) -> None:
        for role in roles:
            pool = self.pools.pop(role, None)
            if pool is not None:
                self.closed_stats.setdefault(role, []).extend(pool.stats())
                pool.close()

    def close(self) -> None:
        with self._lock:
            self._release(tuple(self.pools))


@contextlib.contextmanager
def hosts_for(cfg: RunConfig, hosts: Hosts | None):
    """The run's hosts, or (a stage command run alone) hosts that live for this stage only."""
    if hosts is not None:
        yield hosts
        return
    own = Hosts(cfg)
    try:
        yield own
    finally:
        own.close()


def hosts_coexist(cfg: RunConfig) -> bool:
    """Synthesis and scorer hosts can be up at once (they do not ask for GPUs of the same nodes), so
    one stage may use one pool while another uses the other (`artaug.loop.overlap`)."""
    return not share_gpus(cfg.generate.resources, cfg.scorers.resources)


def hosts_hold_gpus(cfg: RunConfig) -> bool:
    """Warm hosts may hold GPUs that training needs: both ask for GPUs on nodes they could share (no
    node labels, or the same ones). The loop then releases the hosts before training and the next
    stage starts them again; a CPU run, or training on a node group of its own, keeps them."""
    return any(share_gpus(r, cfg.train.resources) for r in (cfg.generate.resources, cfg.scorers.resources))


def share_gpus(a: Resources, b: Resources) -> bool:
    """Both ask for GPUs on nodes they could share (no node labels on either, or the same ones)."""
    if gpus_for(a) <= 0 or gpus_for(b) <= 0:
        return False
    return not a.node_labels or not b.node_labels or a.node_labels == b.node_labels


def gpus_on_nodes(node_labels: list[str]) -> float:
    """GPUs of the alive nodes that carry all of these labels (every alive node without labels)."""
    wanted = (label_selector(node_labels) or {}).items()
    return sum(
        node["Resources"].get("GPU", 0)
        for node in ray.nodes()
        if node["Alive"] and all((node.get("Labels") or {}).get(k) == v for k, v in wanted)
    )


def hosts_summary(stats: dict[str, list[dict]]) -> dict:
    """Per role: hosts, processes, model loads by kind, calls, rows, the busy fraction (seconds in
    calls / seconds alive, over all the role's hosts: where a run's hosts idle) and, per work class
    (FluxGenerator, Enhancer, LatentEncoder, ...), its calls, rows and seconds busy."""
    summary = {}
    for role, hosts in stats.items():
        loads: dict[str, int] = {}
        work: dict[str, dict] = {}
        for host in hosts:
            for kind, count in host["loads"].items():
                loads[kind] = loads.get(kind, 0) + count
            for name, counters in host.get("work", {}).items():
                total = work.setdefault(name, {"calls": 0, "rows": 0, "busy_s": 0.0})
                for key in total:
                    total[key] += counters[key]
        busy, alive = sum(h["busy_s"] for h in hosts), sum(h["alive_s"] for h in hosts)
        summary[role] = {
            "hosts": len(hosts), "processes": len({h["pid"] for h in hosts}), "loads": loads,
            "weight_sets": sum(h.get("weight_sets", 0) for h in hosts),
            "calls": sum(h["calls"] for h in hosts), "rows": sum(h["rows"] for h in hosts),
            "held_s": round(alive, 3), "busy_s": round(busy, 3),
            "busy_fraction": round(busy / alive, 4) if alive else None,
            "work": {name: {**w, "busy_s": round(w["busy_s"], 3)} for name, w in sorted(work.items())},
        }  # fmt: skip
    return summary
