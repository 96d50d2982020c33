"""The Ray Serve application: a FastAPI ingress deployment in front of the model deployment.

    serve.run(build_app(cfg), name="artaug", route_prefix="/")   # what `artaug serve` does
    serve deploy jobs/serve.yaml                  # import_path: artaug.serve.app:app_builder

Back-pressure uses Ray Serve's own queues: a model replica takes `max_ongoing_requests`, each caller
queues at most `max_queued_requests` more, and anything beyond that is answered at once with 503 and
Retry-After (the ingress's own queue at the HTTP proxy is bounded the same way).

The HTTP edge (API key, body limit, OpenAI-shaped errors) is `artaug.serve.edge`.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time

from fastapi import FastAPI
from fastapi.responses import JSONResponse
from ray import serve
from ray.serve.exceptions import BackPressureError
from ray.serve.handle import DeploymentHandle

from artaug import hub
from artaug.cluster import ray_resources
from artaug.config import ConfigError, RunConfig
from artaug.serve import edge
from artaug.serve.api import (
    EnhanceRequest,
    ImageJob,
    ImageRequest,
    ImagesResponse,
    ModelCard,
    ModelList,
    RequestError,
    error_body,
    settle,
    settle_enhance,
)  # fmt: skip
from artaug.serve.critic import CriticModel, engine_deployment
from artaug.serve.interaction import awaited, enhanced
from artaug.serve.model import FluxModel

log = logging.getLogger(__name__)

HEALTH_TIMEOUT_S = 5.0
# How often Serve calls each model replica's check_health: a broken or dead replica is replaced,
# and /healthz reflects it, within about this long.
HEALTH_CHECK_PERIOD_S = 2.0

api = FastAPI(
    title="artaug image API",
    description="Images from FLUX with the ArtAug LoRA fused in, in the shape of OpenAI's Images API.",
    version="1",
)
edge.install(api)
ERRORS = {
    400: {"description": "A field is missing, mistyped or out of bounds (the message names it)."},
    401: {"description": "An API key is set and the request did not send it (Authorization: Bearer)."},
    404: {"description": "The request names a model this server does not serve."},
    413: {"description": "The body is larger than 1 MiB."},
    500: {"description": "The model failed on this request (other requests are not affected)."},
    503: {"description": "The queue is full; retry after the Retry-After header's seconds."},
    504: {"description": "The images were not ready within the request's timeout."},
}


# Helpers the ingress uses are defined above it: Serve serializes the class when it is decorated,
# and names defined later in this module would be missing in the replica.
def _busy(err: BackPressureError) -> JSONResponse:
    retry_after = err.retry_after_s or 1
    message = f"the server is at capacity; retry in {retry_after:g} s"
    return JSONResponse(
        error_body(message, "server_busy"), status_code=503, headers={"Retry-After": f"{retry_after:.0f}"}
    )


def _display_name(source: str) -> str:
    """A local folder's name (its path stays on the server), or the hub id as it is."""
    return os.path.basename(source.rstrip("/")) if os.sep in source else source


@serve.deployment(name="ImageAPI")
@serve.ingress(api)
class ImageAPI:
    """HTTP ingress: checks requests, forwards jobs to the model deployment, shapes the answers."""

    def __init__(self, model: DeploymentHandle, cfg: RunConfig, key_digest: bytes | None = None,
                 critic: DeploymentHandle | None = None):  # fmt: skip
        self.model, self.critic = model, critic
        self.cfg = cfg
        self.created = int(time.time())
        api.state.api_key_digest = key_digest  # read by edge.Edge on every request

    @api.post("/v1/images/generations", response_model=ImagesResponse, response_model_exclude_none=True,
              responses=ERRORS)  # fmt: skip
    async def generations(self, body: ImageRequest) -> ImagesResponse | JSONResponse:
        """Generate `n` PNG images (base64) for a prompt; with `enhance`, each one critiqued and
        regenerated too."""
        job, timeout = settle(body, self.cfg)
        if body.enhance:
            self._check_enhances("enhance")

        async def work():
            images = await awaited(self.model.generate.remote(job))
            return await enhanced(self.model, self.critic, self.cfg, job, images) if body.enhance else images

        return await self._answer(work(), job, timeout)

    @api.post("/v1/images/enhance", response_model=ImagesResponse, response_model_exclude_none=True,
              responses=ERRORS)  # fmt: skip
    async def enhance(self, body: EnhanceRequest) -> ImagesResponse | JSONResponse:
        """Critique a PNG image made with `prompt` (and `seed`) and regenerate it with the critique's
        regions: the interaction algorithm at request time."""
        self._check_enhances(None)
        job, timeout = settle_enhance(body, self.cfg)
        original = {"b64_json": body.image, "seed": job.seed}
        return await self._answer(enhanced(self.model, self.critic, self.cfg, job, [original]), job, timeout)

    def _check_enhances(self, param: str | None) -> None:
        if self.critic is None:
            message = "this server does not enhance: it was started without serve.enhance (no critic)"
            raise RequestError(400, message, param)

    async def _answer(self, work, job: ImageJob, timeout: float) -> ImagesResponse | JSONResponse:
        """`work`'s images within `timeout`; a timeout or a client that leaves cancels what is running."""
        try:
            images = await asyncio.wait_for(work, timeout)
        except TimeoutError:
            message = f"the images were not ready within {timeout:g} s"
            return JSONResponse(error_body(message, "timeout"), status_code=504)
        except BackPressureError as err:
            return _busy(err)
        except Exception as err:  # noqa: BLE001 - a replica failed this request (or died): only it fails
            log.warning("a request failed on a replica: %s", err)
            message = "the model failed on this request; other requests are not affected, retry may succeed"
            return JSONResponse(error_body(message, "server_error"), status_code=500)
        return ImagesResponse(
            created=int(time.time()),
            data=images,
            model=self.cfg.serve.model_name,
            size=f"{job.width}x{job.height}",
            steps=job.steps,
            guidance=job.guidance,
        )

    @api.get("/v1/models", response_model=ModelList)
    async def models(self) -> ModelList:
        """The one model this application serves."""
        card = ModelCard(
            id=self.cfg.serve.model_name,
            created=self.created,
            base=_display_name(self.cfg.model.source),
            loras=[os.path.basename(path) for path in self.cfg.model.loras],
        )
        return ModelList(data=[card])

    @api.get("/healthz")
    async def healthz(self) -> JSONResponse:
        """200 when a model replica answers (or all are busy), 503 when none can."""
        probe = self.model.ready.remote()
        try:
            await asyncio.wait_for(awaited(probe), HEALTH_TIMEOUT_S)
            status, code = "ok", 200
        except BackPressureError:
            status, code = "busy", 200
        except TimeoutError:
            probe.cancel()
            # Queued behind work, or nothing there to answer: Serve's controller knows which.
            running = await asyncio.to_thread(_running_model_replicas)
            status, code = ("busy", 200) if running else ("unavailable", 503)
        except Exception:  # noqa: BLE001 - a replica that is broken or gone cannot answer
            status, code = "unavailable", 503
        return JSONResponse({"status": status, "model": self.cfg.serve.model_name}, status_code=code)


def _running_model_replicas() -> int:
    """Model replicas of this application Serve's controller counts as running (its health checks pass)."""
    app = serve.status().applications.get(serve.get_replica_context().app_name)
    model = app.deployments.get("FluxModel") if app else None
    return model.replica_states.get("RUNNING", 0) if model else 0


def build_app(cfg: RunConfig):
    """The application for `cfg`: model replicas with the configured resources and queues, one ingress."""
    backpressure = {"retry_after_s": cfg.serve.retry_after_s}
    actor_options = ray_resources(cfg.serve.resources)
    if hub.env(cfg.hub):  # the replica's process has `hub.*` before it imports huggingface_hub
        actor_options["runtime_env"] = {"env_vars": hub.env(cfg.hub)}
    model = serve.deployment(FluxModel, name="FluxModel").options(
        ray_actor_options=actor_options,
        health_check_period_s=HEALTH_CHECK_PERIOD_S,
        autoscaling_config={
            "min_replicas": cfg.serve.min_replicas,
            "max_replicas": cfg.serve.max_replicas,
            "target_ongoing_requests": cfg.serve.target_ongoing_requests,
        },
        max_ongoing_requests=cfg.serve.max_ongoing_requests,
        max_queued_requests=cfg.serve.max_queued_requests,
        backpressure_config=backpressure,
    )
    # The ingress only awaits: it admits what the model replicas and their queue can hold (plus
    # room for /healthz and /v1/models), and its own queue at the proxy is bounded too.
    capacity = cfg.serve.max_replicas * cfg.serve.max_ongoing_requests + cfg.serve.max_queued_requests + 16
    ingress = ImageAPI.options(
        ray_actor_options={"num_cpus": 0.5},
        max_ongoing_requests=capacity,
        max_queued_requests=cfg.serve.max_queued_requests,
        backpressure_config=backpressure,
    )
    return ingress.bind(model.bind(cfg), cfg, edge.key_digest(cfg), _critic(cfg, backpressure))


def _critic(cfg: RunConfig, backpressure: dict):
    """The critic deployment when serve.enhance is on (regional regeneration only), else None."""
    if not cfg.serve.enhance:
        return None
    if cfg.enhance.mode != "regional":
        raise ConfigError(
            f"serve.enhance regenerates with the interaction algorithm (enhance.mode: regional), not"
            f" enhance.mode: {cfg.enhance.mode}"
        )
    actor_options = ray_resources(cfg.serve.critic_resources)
    if hub.env(cfg.hub):
        actor_options["runtime_env"] = {"env_vars": hub.env(cfg.hub)}
    critic = serve.deployment(CriticModel, name="CriticModel").options(
        ray_actor_options=actor_options,
        num_replicas=cfg.serve.critic_replicas,
        health_check_period_s=HEALTH_CHECK_PERIOD_S,
        max_ongoing_requests=cfg.serve.critic_max_ongoing_requests,
        max_queued_requests=cfg.serve.max_queued_requests,
        backpressure_config=backpressure,
    )
    return critic.bind(cfg, engine_deployment(cfg) if cfg.critique.backend == "vllm" else None)


def app_builder(args: dict):
    """Entry point for `serve deploy` / RayService (`import_path: artaug.serve.app:app_builder`).

    args (all optional): run_dir, lora, preset, config (a YAML path or URI), set (a list of
    "section.field=value" overrides) - the same choices as `artaug serve`.
    """
    # Imported here: artaug.serve.launch imports this module (build_app) for `artaug serve`.
    from artaug.serve.launch import resolve_config

    known = {"run_dir", "lora", "preset", "config", "set"}
    unknown = sorted(set(args) - known)
    if unknown:
        raise ValueError(f"unknown application args {unknown}; known: {sorted(known)}")
    cfg = resolve_config(
        run_dir=args.get("run_dir"),
        lora=args.get("lora"),
        preset=args.get("preset"),
        config_path=args.get("config"),
        overrides=list(args.get("set") or []),
    )
    return build_app(cfg)
