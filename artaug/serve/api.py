"""The HTTP API's request and response shapes, and the checks every request passes.

The shape follows OpenAI's Images API (`POST /v1/images/generations`: prompt, n, size "WxH",
response_format b64_json) with `seed`, `steps`, `guidance`, `timeout` and `enhance` as extensions;
`POST /v1/images/enhance` (`EnhanceRequest`, `settle_enhance`) takes a client's PNG. Types are
checked strictly by pydantic (no "4" for 4); bounds come from `ServeConfig` and are checked by
`settle`, which turns a request into the jobs the model replica runs. Every problem is a
`RequestError` with a status below 500 and a message naming the field.
"""

from __future__ import annotations

import base64
import binascii
import io
import random
import re
from dataclasses import dataclass
from typing import Literal

from PIL import Image
from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictFloat, StrictInt, StrictStr

from artaug.config import RunConfig

SEED_LIMIT = 2**63
SIZE_PATTERN = re.compile(r"(\d{1,5})x(\d{1,5})")
LONE_SURROGATE = re.compile("[\ud800-\udfff]")


class RequestError(Exception):
    """A request the server will not run; answered with `status` (4xx) and an OpenAI-style error body."""

    def __init__(
        self, status: int, message: str, param: str | None = None, kind: str = "invalid_request_error"
    ):
        super().__init__(message)
        self.status, self.message, self.param, self.kind = status, message, param, kind

    def body(self) -> dict:
        return error_body(self.message, self.kind, self.param)


def error_body(message: str, kind: str, param: str | None = None) -> dict:
    return {"error": {"message": message, "type": kind, "param": param, "code": None}}


class ImageRequest(BaseModel):
    """Body of POST /v1/images/generations."""

    model_config = ConfigDict(extra="forbid")

    prompt: StrictStr = Field(description="What to draw.")
    model: StrictStr | None = Field(None, description="The served model's id (GET /v1/models); optional.")
    n: StrictInt = Field(1, description="Images to generate; image i uses seed + i.")
    size: StrictStr | None = Field(None, description='"WIDTHxHEIGHT", each a multiple of 16.')
    response_format: Literal["b64_json"] = Field("b64_json", description="Only b64_json (PNG) is offered.")
    seed: StrictInt | None = Field(None, description="Extension: seed of the first image; random if omitted.")
    steps: StrictInt | None = Field(None, description="Extension: denoising steps.")
    guidance: StrictFloat | StrictInt | None = Field(None, description="Extension: guidance scale.")
    timeout: StrictFloat | StrictInt | None = Field(
        None, description="Extension: seconds this request may take (at most the server's limit)."
    )
    user: StrictStr | None = Field(None, description="Accepted for OpenAI compatibility; unused.")
    enhance: StrictBool = Field(
        False,
        description="Extension: critique each image and regenerate it with the interaction algorithm"
        " (a server started with serve.enhance); the answer holds both images and the critique.",
    )


class EnhanceRequest(BaseModel):
    """Body of POST /v1/images/enhance: an image and the prompt (and seed) it was made with."""

    model_config = ConfigDict(extra="forbid")

    image: StrictStr = Field(description="The image as base64-encoded PNG; its size is the output's.")
    prompt: StrictStr = Field(description="The prompt the image was made with.")
    model: StrictStr | None = Field(None, description="The served model's id (GET /v1/models); optional.")
    seed: StrictInt | None = Field(None, description="The seed the image was made with; random if omitted.")
    steps: StrictInt | None = Field(None, description="Denoising steps of the regeneration.")
    guidance: StrictFloat | StrictInt | None = Field(None, description="Guidance scale of the regeneration.")
    timeout: StrictFloat | StrictInt | None = Field(
        None, description="Seconds this request may take (at most the server's limit)."
    )


class ImageData(BaseModel):
    b64_json: str = Field(description="The image as base64-encoded PNG (enhanced: the regenerated one).")
    seed: int = Field(description="Extension: the seed that made this image.")
    # Enhanced answers only (left out of plain ones):
    original_b64_json: str | None = Field(None, description="The image before the enhancement.")
    critique: dict | None = Field(None, description="The critic's parsed critique (the schema's JSON).")
    critique_error: str | None = Field(None, description="Why the critic gave no usable critique.")
    regions: list[dict] | None = Field(None, description="The regions regenerated: box (0-1), prompt.")
    enhance_prompt: str | None = Field(None, description="The global prompt of the regeneration.")
    unchanged: bool | None = Field(None, description="True when the critique asked for nothing to redraw.")


class ImagesResponse(BaseModel):
    created: int = Field(description="Unix time the response was made.")
    data: list[ImageData]
    model: str
    size: str
    steps: int
    guidance: float


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "artaug"
    base: str = Field(description="The base model the LoRAs were fused into.")
    loras: list[str] = Field(description="File names of the LoRAs fused into the weights, in order.")


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


@dataclass(frozen=True)
class ImageJob:
    """One request as the model replica sees it: settled values only."""

    prompt: str
    n: int
    width: int
    height: int
    steps: int
    guidance: float
    seed: int

    def settings(self) -> tuple:
        """Requests with equal settings can share one batched pipeline call."""
        return (self.width, self.height, self.steps, self.guidance)


def settle(request: ImageRequest, cfg: RunConfig) -> tuple[ImageJob, float]:
    """The job to run and its timeout, or a RequestError naming the first bad field."""
    if request.model is not None and request.model != cfg.serve.model_name:
        raise RequestError(
            404,
            f"model {request.model!r} is not served here; GET /v1/models lists {cfg.serve.model_name!r}",
            "model",
            "model_not_found",
        )
    if not request.prompt.strip():
        raise RequestError(400, "prompt must not be empty", "prompt")
    surrogate = LONE_SURROGATE.search(request.prompt)
    if surrogate:
        # JSON may spell one ("\\ud800"); no tokenizer can encode it, so it would fail on the replica.
        raise RequestError(
            400, f"prompt: character {surrogate.start()} is a lone surrogate, not valid Unicode", "prompt"
        )
    if len(request.prompt) > cfg.serve.max_prompt_chars:
        raise RequestError(
            400,
            f"prompt has {len(request.prompt)} characters; the limit is {cfg.serve.max_prompt_chars}",
            "prompt",
        )
    if not 1 <= request.n <= cfg.serve.max_n:
        raise RequestError(400, f"n must be between 1 and {cfg.serve.max_n}, got {request.n}", "n")
    width, height = (
        _size(request.size, cfg.serve.max_side)
        if request.size is not None
        else (cfg.generate.width, cfg.generate.height)
    )
    steps = cfg.generate.steps if request.steps is None else request.steps
    if not 1 <= steps <= cfg.serve.max_steps:
        raise RequestError(400, f"steps must be between 1 and {cfg.serve.max_steps}, got {steps}", "steps")
    guidance = float(cfg.generate.guidance if request.guidance is None else request.guidance)
    if not 0 <= guidance <= 100:
        raise RequestError(400, f"guidance must be between 0 and 100, got {guidance}", "guidance")
    seed = random.randrange(2**31) if request.seed is None else request.seed
    if not 0 <= seed <= SEED_LIMIT - request.n:
        raise RequestError(400, f"seed must be in [0, 2**63 - n], got {seed}", "seed")
    timeout = cfg.serve.request_timeout_s
    if request.timeout is not None:
        if not 0 < request.timeout <= cfg.serve.request_timeout_s:
            raise RequestError(
                400,
                f"timeout must be in (0, {cfg.serve.request_timeout_s}] seconds, got {request.timeout}",
                "timeout",
            )
        timeout = float(request.timeout)
    cost = request.n * width * height * steps
    if cost > cfg.serve.max_request_cost:
        raise RequestError(
            400,
            f"the request asks for n x width x height x steps = {cost:,}; the limit is"
            f" {cfg.serve.max_request_cost:,} (fewer images, a smaller size or fewer steps)",
        )
    job = ImageJob(request.prompt, request.n, width, height, steps, guidance, seed)
    return job, timeout


def settle_enhance(request: EnhanceRequest, cfg: RunConfig) -> tuple[ImageJob, float]:
    """The regeneration's job (the image's size, n = 1) and its timeout, or a RequestError naming the
    first bad field. The image is checked from its header before it is decoded."""
    try:
        png = base64.b64decode(request.image, validate=True)
        image = Image.open(io.BytesIO(png), formats=["PNG"])
    except (binascii.Error, ValueError):
        raise RequestError(400, "image: not valid base64", "image") from None
    except Exception:  # noqa: BLE001 - PIL raises several types for what is not a PNG
        raise RequestError(400, "image: not a PNG image", "image") from None
    width, height = image.size
    plain = ImageRequest(
        prompt=request.prompt, model=request.model, size=f"{width}x{height}", seed=request.seed,
        steps=request.steps, guidance=request.guidance, timeout=request.timeout,
    )  # fmt: skip
    try:
        job, timeout = settle(plain, cfg)
    except RequestError as err:
        if err.param == "size":
            raise RequestError(400, err.message.replace("size:", "image: its", 1), "image") from None
        raise
    try:
        image.load()
    except Exception as err:  # noqa: BLE001 - a truncated or corrupt PNG
        raise RequestError(400, f"image: the PNG does not decode ({type(err).__name__})", "image") from None
    return job, timeout


def _size(size: str, max_side: int) -> tuple[int, int]:
    match = SIZE_PATTERN.fullmatch(size)
    if not match:
        raise RequestError(400, f'size must look like "512x512" (WIDTHxHEIGHT), got {size!r}', "size")
    width, height = int(match[1]), int(match[2])
    for name, value in (("width", width), ("height", height)):
        if value <= 0 or value % 16:
            raise RequestError(400, f"size: {name} {value} is not a positive multiple of 16", "size")
        if value > max_side:
            raise RequestError(400, f"size: {name} {value} is above the limit of {max_side}", "size")
    return width, height


def describe_validation_error(errors: list[dict]) -> tuple[str, str | None]:
    """One clear sentence (and the field) for pydantic's first complaint about a body."""
    first = errors[0]
    location = [str(part) for part in first.get("loc", ()) if part != "body"]
    field = ".".join(location) or None
    kind = first.get("type", "")
    if kind == "json_invalid":
        return "the body is not valid JSON", None
    if kind == "missing":
        if field is None:
            return "the body is empty: send a JSON object with at least a prompt", None
        return f"{field} is required", field
    if kind == "extra_forbidden":
        return f"{field} is not a known field", field
    if kind == "model_attributes_type" or (field is None and "dict" in kind):
        return "the body must be a JSON object (Content-Type: application/json)", None
    return f"{field}: {first.get('msg', 'invalid value')}", field
