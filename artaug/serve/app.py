"""The Ray Serve application: a FastAPI ingress deployment in front of the model deployment.

    serve.run(build_app(cfg), name="artaug", route_prefix="/")   # what `artaug serve` does
    serve deploy jobs/serve.yaml                  # import_path: artaug.serve.app:app_builder

Back-pressure uses Ray Serve's own queues: a model replica takes `max_ongoing_requests`, each caller
queues at most `max_queued_requests` more, and anything beyond that is answered at once with 503 and
Retry-After (the ingress's own queue at the HTTP proxy is bounded the same way).
"""

from __future__ import annotations

import asyncio
import os
import time

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from ray import serve
from ray.serve.exceptions import BackPressureError
from ray.serve.handle import DeploymentHandle

from artaug.cluster import ray_resources
from artaug.config import RunConfig
from artaug.serve.api import (
    ImageRequest,
    ImagesResponse,
    ModelCard,
    ModelList,
    RequestError,
    describe_validation_error,
    error_body,
    settle,
)
from artaug.serve.model import FluxModel

# A body is a prompt (at most serve.max_prompt_chars characters, at most 100,000: see config.py) and a
# few small fields: anything larger than this is refused before it is parsed.
MAX_BODY_BYTES = 1024 * 1024
HEALTH_TIMEOUT_S = 5.0

api = FastAPI(
    title="artaug image API",
    description="Images from FLUX with the ArtAug LoRA fused in, in the shape of OpenAI's Images API.",
    version="1",
)
ERRORS = {
    400: {"description": "A field is missing, mistyped or out of bounds (the message names it)."},
    404: {"description": "The request names a model this server does not serve."},
    503: {"description": "The queue is full; retry after the Retry-After header's seconds."},
    504: {"description": "The images were not ready within the request's timeout."},
}


@api.exception_handler(RequestValidationError)
async def _invalid_body(request: Request, exc: RequestValidationError) -> JSONResponse:
    message, field = describe_validation_error(exc.errors())
    return JSONResponse(error_body(message, "invalid_request_error", field), status_code=400)


@api.exception_handler(RequestError)
async def _refused(request: Request, exc: RequestError) -> JSONResponse:
    return JSONResponse(exc.body(), status_code=exc.status)


@api.middleware("http")
async def _limit_body_size(request: Request, call_next):
    length = request.headers.get("content-length", "")
    if length.isdigit() and int(length) > MAX_BODY_BYTES:
        message = f"the body has {length} bytes; the limit is {MAX_BODY_BYTES}"
        return JSONResponse(error_body(message, "invalid_request_error"), status_code=413)
    return await call_next(request)


# Helpers the ingress uses are defined above it: Serve serializes the class when it is decorated,
# and names defined later in this module would be missing in the replica.
async def _result(response):
    return await response


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

    def __init__(self, model: DeploymentHandle, cfg: RunConfig):
        self.model = model
        self.cfg = cfg
        self.created = int(time.time())

    @api.post("/v1/images/generations", response_model=ImagesResponse, responses=ERRORS)
    async def generations(self, body: ImageRequest) -> ImagesResponse | JSONResponse:
        """Generate `n` PNG images (base64) for a prompt."""
        job, timeout = settle(body, self.cfg)
        response = self.model.generate.remote(job)
        try:
            images = await asyncio.wait_for(_result(response), timeout)
        except TimeoutError:
            response.cancel()  # stops the denoising loop on the replica
            message = f"the images were not ready within {timeout:g} s"
            return JSONResponse(error_body(message, "timeout"), status_code=504)
        except BackPressureError as err:
            return _busy(err)
        except asyncio.CancelledError:
            response.cancel()  # the client went away: stop its work too
            raise
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
            await asyncio.wait_for(_result(probe), HEALTH_TIMEOUT_S)
            status, code = "ok", 200
        except (BackPressureError, TimeoutError):
            probe.cancel()
            status, code = "busy", 200
        except Exception:  # noqa: BLE001 - any failure to reach a replica means unhealthy
            status, code = "unavailable", 503
        return JSONResponse({"status": status, "model": self.cfg.serve.model_name}, status_code=code)


def build_app(cfg: RunConfig):
    """The application for `cfg`: model replicas with the configured resources and queues, one ingress."""
    backpressure = {"retry_after_s": cfg.serve.retry_after_s}
    model = serve.deployment(FluxModel, name="FluxModel").options(
        ray_actor_options=ray_resources(cfg.serve.resources),
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
    return ingress.bind(model.bind(cfg), cfg)


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
