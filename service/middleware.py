"""The middleware every request passes (outermost first): CORS (when origins are set),
authentication and observation (`ObserveMiddleware`), then the body limit (`BodyLimitMiddleware`),
which applies whoever reads the body. Plain ASGI, so that routes still see the client's disconnect."""
from __future__ import annotations

import asyncio
import hmac
import logging
import re
import time
import uuid
from collections.abc import Callable

from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse
from starlette.datastructures import Headers
from starlette.routing import Match, Router

from coordtok.formats import tokens
from coordtok.service.errors import BodyTimeout, BodyTooLarge, RequestError, error_response, refusal
from coordtok.service.metrics import Metrics
from coordtok.service.settings import Settings

log = logging.getLogger("coordtok.service")
# Routes open without an API key: liveness, readiness, metrics and the playground page (its files
# only: the API calls it makes send the key typed into it).
_OPEN_ROUTES = {"/healthz", "/readyz", "/metrics", "/", "/favicon.ico"}
_OPEN_PREFIX = "/static/"
_REQUEST_ID = re.compile(r"[A-Za-z0-9._-]{1,64}")
# Body limit of the routes that take no upload (a generate request is well under 1 KiB).
_SMALL_BODY_BYTES = 64 * 1024
# A body's minimum rate counts from this many seconds after its headers (connection set-up, a
# client's first read of the file).
_BODY_RATE_GRACE_S = 5.0
UNMATCHED = "unmatched"  # the metrics' route label of a path no route matches


def add_middleware(app: FastAPI, settings: Settings, metrics: Metrics) -> None:
    """Install the middleware; added innermost first (Starlette wraps each addition around the last)."""
    app.add_middleware(BodyLimitMiddleware, limit_of=BodyLimits(app, settings), timeout_s=settings.body_timeout_s,
                       min_rate=settings.body_min_rate)
    app.add_middleware(ObserveMiddleware, metrics=metrics, keys=[k.get_secret_value().encode() for k in settings.api_keys],
                       router=app.router)
    if settings.cors_origins:  # outermost: a browser's preflight carries no key
        app.add_middleware(CORSMiddleware, allow_origins=settings.cors_origins, allow_methods=["GET", "POST", "DELETE"],
                           allow_headers=["Authorization", "Content-Type", "Accept", "Idempotency-Key", "X-Request-ID"],
                           expose_headers=["X-Request-ID", "Location", "Retry-After", "Idempotent-Replayed"])


class BodyLimits:
    """The body limit of a path: a video's for the upload routes, the largest token file of
    max_clips clips the model could take for /v1/decode, 64 KiB for the others."""

    def __init__(self, app: FastAPI, settings: Settings) -> None:
        self.app, self.settings = app, settings

    def __call__(self, path: str) -> int:
        if path in ("/v1/encode", "/v1/preview"):  # a video
            return self.settings.max_upload_bytes
        if path == "/v1/decode":
            runtime = self.app.state.runtime  # None until the model is loaded
            if runtime is None:
                return _SMALL_BODY_BYTES
            return min(self.settings.max_upload_bytes, tokens.largest_file_bytes(runtime.config, self.settings.max_clips))
        return _SMALL_BODY_BYTES


class ObserveMiddleware:
    """Authenticate, give each request an id (echoed in `X-Request-ID`), count it and log it
    (never the key)."""

    def __init__(self, app, metrics: Metrics, keys: list[bytes], router: Router) -> None:
        self.app, self.metrics, self.keys, self.router = app, metrics, keys, router

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started = time.perf_counter()
        headers = Headers(scope=scope)
        route = scope["path"]
        request_id = headers.get("x-request-id", "")
        if not _REQUEST_ID.fullmatch(request_id):
            request_id = uuid.uuid4().hex
        scope.setdefault("state", {})["request_id"] = request_id  # for what logs once its answer has started
        status = 500

        async def send_with_id(message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message = {**message, "headers": [*message.get("headers", []), (b"x-request-id", request_id.encode())]}
            await send(message)

        open_route = route in _OPEN_ROUTES or route.startswith(_OPEN_PREFIX)
        try:
            if self.keys and not open_route and not _authorised(headers.get("authorization", ""), self.keys):
                unauthorized = error_response("Unauthorized", "send a valid API key as 'Authorization: Bearer KEY'", 401,
                                              {"WWW-Authenticate": "Bearer"})
                await unauthorized(scope, receive, send_with_id)
            else:
                await self.app(scope, receive, send_with_id)
        finally:  # an answer cut after its start (service/streaming.py) is counted and logged too
            seconds = time.perf_counter() - started
            self.count(scope, status, seconds)
            log.info("request", extra={"request_id": request_id, "method": scope["method"], "route": route,
                                       "status": status, "seconds": round(seconds, 4)})

    def count(self, scope, status: int, seconds: float) -> None:
        """Count an answered API request. Labelled by route template (/v1/jobs/{job_id}: one label
        for every job), never by the raw path: refused and unknown paths would grow /metrics
        without bound."""
        template = route_template(self.router, scope)
        if template.startswith("/v1/") or template == UNMATCHED:
            self.metrics.requests.labels(template, str(status)).inc()
            self.metrics.duration.labels(template).observe(seconds)
            if status >= 400:  # the reason: the error type a handler recorded, else the status
                reason = scope.get("state", {}).get("failure", "Unauthorized" if status == 401 else f"http_{status}")
                self.metrics.failures.labels(template, reason).inc()


def route_template(router: Router, scope) -> str:
    """The path template of the route `scope` matches (its path, whatever the method), else UNMATCHED."""
    return next((route.path for route in router.routes if route.matches(scope)[0] is not Match.NONE), UNMATCHED)


def _authorised(header: str, keys: list[bytes]) -> bool:
    """Constant-time comparison of a bearer token with every configured key."""
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer":
        return False
    return any([hmac.compare_digest(token.encode(), key) for key in keys])


class BodyLimitMiddleware:
    """Bound every request body while it streams in, whoever reads it (the upload code, FastAPI's
    JSON parsing), in size by `limit_of(path)` bytes and in time: complete within `timeout_s` of
    the headers and, from `_BODY_RATE_GRACE_S` on, arriving at `min_rate` bytes/s on average.

    A declared Content-Length past the limit is refused with 413 before the app runs; a body that
    passes it while streaming (chunked, without Content-Length) ends the read with `BodyTooLarge`,
    one that is late with `BodyTimeout` (408), and the answer is that refusal whatever the app
    made of the failed read. A refusal closes the connection: the rest of the body is not read."""

    def __init__(self, app, limit_of: Callable[[str], int], timeout_s: float, min_rate: float) -> None:
        self.app, self.limit_of, self.timeout_s, self.min_rate = app, limit_of, timeout_s, min_rate

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        limit = self.limit_of(scope["path"])
        declared = Headers(scope=scope).get("content-length", "")
        if declared.isdigit() and int(declared) > limit:
            return await _refusal(BodyTooLarge(f"the body is {declared} bytes; the limit is {limit}"))(scope, receive, send)
        arrived = time.monotonic()
        received, more, refused, started, replaced = 0, True, None, False, False

        async def bounded_receive():
            nonlocal received, more, refused
            if not more:  # the body is complete: what follows is the disconnect a route may wait for
                return await receive()
            due = min(arrived + self.timeout_s, arrived + _BODY_RATE_GRACE_S + received / self.min_rate)
            try:
                message = await asyncio.wait_for(receive(), due - time.monotonic())
            except asyncio.TimeoutError:
                refused = BodyTimeout(
                    f"the body did not arrive in time: {received} bytes after {time.monotonic() - arrived:.1f} s; "
                    f"a body must arrive within {self.timeout_s:g} s, at {self.min_rate:g} bytes/s or faster")
                raise refused from None
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                more = message.get("more_body", False)
                if received > limit:
                    refused = BodyTooLarge(f"the body exceeds the limit of {limit} bytes")
                    raise refused
            else:
                more = False
            return message

        async def checked_send(message) -> None:
            nonlocal started, replaced
            if message["type"] == "http.response.start":
                started = True
                if refused is not None:  # whatever the app answered (a 400 for a body it could not read, say)
                    replaced = True
                    return await _refusal(refused)(scope, receive, send)
            if not replaced:
                await send(message)

        try:
            await self.app(scope, bounded_receive, checked_send)
        except Exception:
            if refused is None or started:
                raise
            await _refusal(refused)(scope, receive, send)


def _refusal(error: RequestError) -> JSONResponse:
    """The answer to a body refused while it arrived; the connection is closed after it."""
    return refusal(error, {"Connection": "close"})
