"""The model deployment: each replica holds one fused FLUX pipeline and generates batched images.

Every request is split into its n images; `@serve.batch` gathers images from concurrent requests
(those that arrive while the pipeline is busy wait for it and then form the next batch together),
and images with the same size, steps and guidance share one call of our sampling loop
(`artaug.models.sampling.sample`, in arrival order, one torch.Generator per image from its seed,
exactly as the generate stage does), so a served image equals the generate stage's image for the
same prompt, seed and batch composition.

The sampling loop runs on one worker thread so the replica's event loop stays free to hear about
cancellations. When every image of a call has been cancelled (the client disconnected or its
timeout passed), the loop's `should_stop` hook stops it before the next step.

A call that fails is retried image by image, so a failure costs only the request that caused it
(`ImageFailed`); when even a one-step health probe then fails, the pipeline itself is broken and
`check_health` (Serve calls it periodically) fails, so Serve replaces the replica.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import torch
from ray import serve

from artaug import hub
from artaug.config import RunConfig
from artaug.images import png_bytes
from artaug.models.interaction import sampling_options
from artaug.models.sampling import Cancelled, Job, Region, sample
from artaug.models.synthesis import load_pipeline
from artaug.serve.api import ImageJob

log = logging.getLogger(__name__)


@dataclass
class ImageTask:
    """One image of a request, as it travels through the batch queue."""

    prompt: str
    seed: int
    settings: tuple
    regions: tuple[Region, ...] = ()
    """The interaction's regions (an enhanced request's regeneration); none for a plain image."""
    cancelled: threading.Event = field(default_factory=threading.Event)


@dataclass
class Counters:
    """What the replica has done, for tests, benchmarks and operators (`FluxModel.stats`)."""

    requests: int = 0
    images: int = 0
    calls: int = 0
    steps: int = 0
    """Denoising steps run (counted between steps, as each one starts)."""
    cancelled_calls: int = 0
    failed_calls: int = 0
    """Pipeline calls that raised (a failed call of several images is then retried image by image)."""
    largest_call: int = 0
    busy: bool = False
    lora_layers: int = 0
    call_sizes: dict = field(default_factory=dict)


class ImageFailed(RuntimeError):
    """This request's images could not be made; the replica's log holds the traceback."""


PROBE = ImageTask("health probe", 0, (16, 16, 1, 1.0))


class FluxModel:
    """Serve deployment class; `artaug.serve.app` sets its options (resources, autoscaling, queues)."""

    def __init__(self, cfg: RunConfig):
        torch.set_num_threads(cfg.serve.resources.torch_threads)
        self.cfg = cfg
        hub.apply(cfg.hub)  # build_app also sets it in the replica's environment, before any import
        self.pipe = load_pipeline(cfg.model)
        self.broken: str | None = None
        # One thread: the pipeline's scheduler keeps per-call state, so calls must not overlap.
        self.worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="flux")
        # Fused and unloaded: no LoRA layer may remain (inference costs what the base model costs).
        lora_layers = [n for n, _ in self.pipe.transformer.named_parameters() if "lora" in n]
        self.counters = Counters(lora_layers=len(lora_layers))
        # Serve forms a batch from what arrives within batch_wait_timeout_s of its first request, even
        # while the previous batch still runs. New requests wait here until the pipeline is free, so
        # everything that queued up meanwhile arrives at once and fills the next batch.
        self._pipeline_free = asyncio.Event()
        self._pipeline_free.set()
        self._images.set_max_batch_size(cfg.serve.max_batch_size)
        self._images.set_batch_wait_timeout_s(cfg.serve.batch_wait_timeout_s)
        log.info("model replica ready: %s with %d LoRA(s) fused", cfg.model.source, len(cfg.model.loras))

    async def generate(self, job: ImageJob, regions: tuple[Region, ...] = ()) -> list[dict]:
        """The request's n images as {"b64_json": PNG base64, "seed": int}, in seed order; with
        `regions`, each composed under its mask (the interaction algorithm, `enhance.*` masks)."""
        self.counters.requests += 1
        tasks = [ImageTask(job.prompt, job.seed + i, job.settings(), regions) for i in range(job.n)]
        try:
            await self._pipeline_free.wait()
            images = list(await asyncio.gather(*(self._images(task) for task in tasks)))
        except asyncio.CancelledError:
            for task in tasks:
                task.cancelled.set()
            raise
        failed = next((image for image in images if isinstance(image, BaseException)), None)
        if failed is not None:
            raise ImageFailed(f"the model failed on this request ({type(failed).__name__})")
        return images

    def stats(self) -> dict:
        c = self.counters
        return {**c.__dict__, "call_sizes": dict(c.call_sizes)}

    def hub_settings(self) -> dict:
        """Where this replica's process reads hub weights from (what `hub.*` set before it loaded)."""
        return hub.settings()

    def check_health(self) -> None:
        """Serve's health check: fails once the pipeline cannot draw even a probe, so Serve replaces it."""
        if self.broken:
            raise RuntimeError(self.broken)

    def ready(self) -> bool:
        """The ingress's /healthz probe: True, or the reason this replica cannot generate."""
        self.check_health()
        return True

    @serve.batch(max_batch_size=4, batch_wait_timeout_s=0.01)
    async def _images(self, tasks: list[ImageTask]) -> list[dict | None]:
        """One batch from the queue: a pipeline call per group of equal settings, in arrival order."""
        results: dict[int, dict | None] = {}
        groups: dict[tuple, list[int]] = {}
        for index, task in enumerate(tasks):
            groups.setdefault(task.settings, []).append(index)
        loop = asyncio.get_running_loop()
        self._pipeline_free.clear()
        try:
            for settings, indexes in groups.items():
                group = [tasks[i] for i in indexes]
                # Cancelled requests' futures are already done; their images are simply not needed.
                images = await self._call(loop, group, settings)
                results.update(zip(indexes, images, strict=True))
        finally:
            self._pipeline_free.set()
        return [results[i] for i in range(len(tasks))]

    async def _call(self, loop, group: list[ImageTask], settings: tuple) -> list:
        """The group's images; a failed call is retried image by image, each failure returned as the error."""
        try:
            return await loop.run_in_executor(self.worker, self._run, group, settings)
        except Exception as err:  # noqa: BLE001 - any failure is one request's, until the probe says otherwise
            self.counters.failed_calls += 1
            if len(group) > 1:
                log.warning("a call of %d images failed (%r): retrying them one by one", len(group), err)
                return [image for task in group for image in await self._call(loop, [task], settings)]
            log.exception("an image of seed %d failed", group[0].seed)
            await self._probe(loop)
            return [err]

    async def _probe(self, loop) -> None:
        """After a failure: does the pipeline still draw a tiny image? If not, the replica is broken."""
        try:
            await loop.run_in_executor(self.worker, self._run, [PROBE], PROBE.settings)
        except Exception as err:  # noqa: BLE001 - the reason goes to the health check
            self.broken = f"the pipeline fails even on a one-step probe: {type(err).__name__}: {err}"
            log.error("replica unhealthy: %s", self.broken)

    def _run(self, group: list[ImageTask], settings: tuple) -> list[dict | None]:
        """Runs on the worker thread: one sampling call, stopped between steps once all are cancelled."""
        width, height, steps, guidance = settings
        c = self.counters
        if all(task.cancelled.is_set() for task in group):
            return [None] * len(group)
        done = 0

        def should_stop() -> bool:
            nonlocal done
            if all(task.cancelled.is_set() for task in group):
                return True
            c.steps += 1
            done += 1
            return False

        c.busy = True
        c.calls += 1
        c.largest_call = max(c.largest_call, len(group))
        c.call_sizes[len(group)] = c.call_sizes.get(len(group), 0) + 1
        start = time.perf_counter()
        try:
            masks = sampling_options(self.cfg.enhance) if any(task.regions for task in group) else {}
            images = sample(
                self.pipe,
                [Job(task.prompt, task.seed, list(task.regions)) for task in group],
                width=width,
                height=height,
                steps=steps,
                guidance=guidance,
                max_sequence_length=self.cfg.model.max_sequence_length,
                should_stop=should_stop,
                **masks,
            )
        except Cancelled:
            c.cancelled_calls += 1
            log.info("cancelled: stopped a call of %d image(s) after %d of %d steps", len(group), done, steps)
            return [None] * len(group)
        finally:
            c.busy = False
        c.images += len(group)
        log.debug("%d image(s) %dx%d in %.3f s", len(group), width, height, time.perf_counter() - start)
        return [
            {"b64_json": base64.b64encode(png_bytes(image)).decode("ascii"), "seed": task.seed}
            for task, image in zip(group, images, strict=True)
        ]
