"""Errors -> HTTP answers: the one table of statuses and the one error body.

Domain errors (formats, engine, jobs) say what went wrong; only `STATUSES` says which HTTP status
that is. The service's own request errors (`RequestError`, `uploads.UploadError`) carry the status
the code that refuses the request chose. Every refusal answers
`{"error": {"type": ..., "message": ...}}`, and a 503 says when to retry (`Retry-After`);
`add_handlers` makes every route answer so.
"""
from __future__ import annotations

from collections.abc import Mapping

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect
from starlette.routing import Match

from coordtok.formats.tokens import TokenError
from coordtok.formats.video import CorruptMedia, MediaError, MediaTooLarge, UnsupportedMedia
from coordtok.service import jobs
from coordtok.service.engine import DeadlineExceeded, DeviceFailure, EngineError, NotReady, QueueFull
from coordtok.service.uploads import UploadError

# Error type -> status; an error takes the entry of the first of its classes (its own first) listed.
STATUSES: dict[type[Exception], int] = {
    UnsupportedMedia: 415,
    CorruptMedia: 422,
    MediaTooLarge: 413,
    MediaError: 400,
    TokenError: 422,
    QueueFull: 503,
    NotReady: 503,
    DeadlineExceeded: 504,
    EngineError: 500,
    jobs.JobNotFound: 404,
    jobs.JobConflict: 409,
    jobs.TooManyJobs: 503,
    jobs.GeneratorUnavailable: 503,
    jobs.JobError: 422,
    Exception: 500,
}
# The OpenAPI description of the error body.
ERROR_CONTENT = {"application/json": {"schema": {"type": "object", "required": ["error"], "properties": {"error": {
    "type": "object", "required": ["type", "message"],
    "properties": {"type": {"type": "string"}, "message": {"type": "string"}}}}}}}


class RequestError(Exception):
    """A request the server cannot serve as sent; `http_status` says which 4xx."""

    def __init__(self, message: str, http_status: int = 422) -> None:
        super().__init__(message)
        self.http_status = http_status


class BodyTooLarge(RequestError):
    """The request body passed the route's limit (413)."""

    def __init__(self, message: str) -> None:
        super().__init__(message, 413)


class BodyTimeout(RequestError):
    """The request body did not arrive in time (408)."""

    def __init__(self, message: str) -> None:
        super().__init__(message, 408)


class ClientGone(Exception):
    """The client disconnected while its work waited or ran."""


def status_of(error: Exception) -> int:
    """The HTTP status that answers `error`. A device failure is worth a retry (503) when the
    device ran out of memory or was lost, else it is the model's (500)."""
    if isinstance(error, (RequestError, UploadError)):
        return error.http_status
    if isinstance(error, DeviceFailure) and (error.out_of_memory or error.device_lost):
        return 503
    return next(STATUSES[kind] for kind in type(error).__mro__ if kind in STATUSES)


def error_response(kind: str, message: str, status: int, headers: Mapping[str, str] | None = None) -> JSONResponse:
    """The answer to a refused request: `{"error": {"type": kind, "message": message}}`."""
    retry = {"Retry-After": "1"} if status == 503 else {}
    return JSONResponse({"error": {"type": kind, "message": message}}, status, headers={**retry, **(headers or {})} or None)


def refusal(error: Exception, headers: Mapping[str, str] | None = None) -> JSONResponse:
    """The answer to `error`: its type, its message and its status (`status_of`)."""
    return error_response(type(error).__name__, str(error), status_of(error), headers)


async def client_gone(request: Request, error: Exception) -> Response:
    return Response(status_code=499)  # nobody reads it: nginx's "client closed request"


async def known_error(request: Request, error: Exception) -> JSONResponse:
    request.state.failure = type(error).__name__  # the reason ObserveMiddleware counts
    return refusal(error)


async def invalid_request(request: Request, error: RequestValidationError) -> JSONResponse:
    request.state.failure = "ValidationError"
    message = "; ".join(f"{'.'.join(str(part) for part in e['loc'])}: {e['msg']}" for e in error.errors())
    return error_response("ValidationError", message, 422)


async def http_error(request: Request, error: HTTPException) -> JSONResponse:
    """Starlette's own refusals (unknown route 404, method 405) in the same shape. A 405's
    `Allow` names the methods of every route of the path (Starlette's, only the first's)."""
    headers = error.headers
    if error.status_code == 405:
        allowed = {method for route in request.app.router.routes if route.matches(request.scope)[0] is Match.PARTIAL
                   for method in getattr(route, "methods", None) or ()}
        headers = {**(headers or {}), "Allow": ", ".join(sorted(allowed))}
    return error_response("HTTPError", str(error.detail), error.status_code, headers)


def add_handlers(app: FastAPI) -> None:
    """Answer every error a route raises as `refusal` says (a client gone: 499, unread)."""
    app.add_exception_handler(ClientGone, client_gone)
    app.add_exception_handler(ClientDisconnect, client_gone)  # gone during the upload
    for kind in (MediaError, UploadError, TokenError, EngineError, RequestError, jobs.JobError):
        app.add_exception_handler(kind, known_error)
    app.add_exception_handler(RequestValidationError, invalid_request)
    app.add_exception_handler(HTTPException, http_error)
