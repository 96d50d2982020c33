"""The HTTP edge of the image API: the API key, the body limit, and OpenAI-shaped errors for everything.

Every answer that is not a success has the shape of OpenAI's errors,
`{"error": {"message", "type", "param", "code"}}`: bad bodies (empty, not UTF-8, not JSON, nested too
deeply, too large), unknown routes and methods, a missing or wrong key, and failures on a replica.

The body limit counts the bytes actually read, so a chunked body (no Content-Length) is stopped at
the limit too. Ray Serve's HTTP proxy reads what the client sends while the request is open; the
limit ends the request, and a reverse proxy in front (e.g. nginx `client_max_body_size`) stops it
before Ray when the API is exposed.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import logging
import os

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from artaug.config import RunConfig
from artaug.serve.api import RequestError, describe_validation_error, error_body

log = logging.getLogger(__name__)

# A body is a prompt (at most serve.max_prompt_chars characters, at most 100,000: see config) and a
# few small fields: anything larger than this is refused before it is parsed.
MAX_BODY_BYTES = 1024 * 1024
# Paths that need the key when one is set; /healthz (probes), /docs and /openapi.json stay open.
PROTECTED_PREFIX = "/v1/"
ROUTES = "POST /v1/images/generations, POST /v1/images/enhance, GET /v1/models, GET /healthz"


class BodyTooLarge(HTTPException):
    def __init__(self, size: str):
        super().__init__(413, f"the body has {size} bytes; the limit is {MAX_BODY_BYTES}")


def key_digest(cfg: RunConfig) -> bytes | None:
    """SHA-256 of the API key in $serve.api_key_env of this process, or None (the API is open).

    Replicas get the digest, never the key; comparing digests with hmac.compare_digest takes the
    same time whatever the presented key.
    """
    key = os.environ.get(cfg.serve.api_key_env, "")
    if key:
        return hashlib.sha256(key.encode()).digest()
    if not _is_loopback(cfg.serve.host):
        log.warning(
            "serving on %s without an API key: anyone who reaches this address can generate images;"
            " set %s to require Authorization: Bearer <key>",
            cfg.serve.host,
            cfg.serve.api_key_env,
        )
    return None


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a host name: assume it is reachable from elsewhere


def _authorized(headers: list[tuple[bytes, bytes]], digest: bytes) -> bool:
    value = next((v for k, v in headers if k == b"authorization"), b"")
    scheme, _, presented = value.partition(b" ")
    if scheme.lower() != b"bearer":
        return False
    return hmac.compare_digest(hashlib.sha256(presented.strip()).digest(), digest)


class Edge:
    """ASGI middleware: the API key (read from `app.state.api_key_digest`) and the body limit."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        refusal = self._refusal(scope)
        if refusal is not None:
            return await refusal(scope, receive, send)
        read = 0

        async def limited_receive():
            nonlocal read
            message = await receive()
            if message["type"] == "http.request":
                read += len(message.get("body", b""))
                if read > MAX_BODY_BYTES:
                    raise BodyTooLarge(f"more than {MAX_BODY_BYTES}")
            return message

        await self.app(scope, limited_receive, send)

    def _refusal(self, scope) -> JSONResponse | None:
        digest = getattr(scope["app"].state, "api_key_digest", None)
        if (
            digest
            and scope["path"].startswith(PROTECTED_PREFIX)
            and not _authorized(scope["headers"], digest)
        ):
            message = "a valid API key is required: send Authorization: Bearer <key>"
            headers = {"WWW-Authenticate": "Bearer"}
            return JSONResponse(error_body(message, "invalid_api_key"), status_code=401, headers=headers)
        length = next((v for k, v in scope["headers"] if k == b"content-length"), b"").decode("latin-1")
        if length.isdigit() and int(length) > MAX_BODY_BYTES:
            return JSONResponse(error_body(BodyTooLarge(length).detail, "invalid_request_error"), 413)
        return None


def install(api: FastAPI) -> None:
    """The edge middleware and an OpenAI-shaped answer for every error the app can give."""
    api.add_middleware(Edge)
    api.add_exception_handler(RequestValidationError, _invalid_body)
    api.add_exception_handler(RequestError, _refused)
    api.add_exception_handler(HTTPException, _http_error)
    api.add_exception_handler(Exception, _internal_error)


async def _invalid_body(request: Request, exc: RequestValidationError) -> JSONResponse:
    message, field = describe_validation_error(exc.errors())
    return JSONResponse(error_body(message, "invalid_request_error", field), status_code=400)


async def _refused(request: Request, exc: RequestError) -> JSONResponse:
    return JSONResponse(exc.body(), status_code=exc.status)


async def _http_error(request: Request, exc: HTTPException) -> JSONResponse:
    message = str(exc.detail)
    if exc.status_code == 404:
        message = f"no route {request.method} {request.url.path}; the API has {ROUTES}"
    elif exc.status_code == 405:
        message = f"{request.method} is not allowed on {request.url.path}; the API has {ROUTES}"
    elif exc.status_code == 400:  # FastAPI could not parse the body; its cause says why
        cause = exc.__cause__
        if isinstance(cause, UnicodeDecodeError):
            message = "the body is not valid UTF-8"
        elif isinstance(cause, RecursionError):
            message = "the body's JSON is nested too deeply"
        else:
            message = "the body is not valid JSON"
    return JSONResponse(
        error_body(message, "invalid_request_error"), status_code=exc.status_code, headers=exc.headers
    )


async def _internal_error(request: Request, exc: Exception) -> JSONResponse:
    log.error("unexpected error on %s %s", request.method, request.url.path, exc_info=exc)
    return JSONResponse(error_body("internal server error", "server_error"), status_code=500)
