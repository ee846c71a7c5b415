"""Domain exceptions, mapped to status codes in one place, and the one JSON error shape.

Every error leaves the service as `{"error": {"code": ..., "message": ...}}`. A 500 says
"internal error" and logs the traceback; exception text never reaches a client.
"""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from contract import errors as contract_errors
from service.observability.request_ids import HEADER, current_request_id, note_error

log = logging.getLogger(__name__)


class ServiceError(Exception):
    """An error a client can be told about. Subclasses fix the status and the code."""

    status = 500
    code = "internal"

    def __init__(self, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.headers = headers or {}


class EmptyBody(ServiceError):
    status, code = 400, "empty_body"


class Unauthorized(ServiceError):
    status, code = 401, "unauthorized"


class PayloadTooLarge(ServiceError):
    status, code = 413, "payload_too_large"


class AudioTooLong(ServiceError):
    status, code = 413, "audio_too_long"


class AudioTooLarge(ServiceError):
    """More samples to decode than the budget (e.g. many channels at a high rate)."""

    status, code = 413, "audio_too_large"


class UnsupportedMediaType(ServiceError):
    status, code = 415, "unsupported_media_type"


class InvalidAudio(ServiceError):
    status, code = 422, "invalid_audio"


class Overloaded(ServiceError):
    status, code = 503, "overloaded"


class NotReady(ServiceError):
    status, code = 503, "not_ready"


class DeadlineExceeded(ServiceError):
    status, code = 504, "deadline_exceeded"


class InferenceFailed(ServiceError):
    """The backend raised on this request's batch. The message stays generic on purpose."""

    status, code = 500, "internal"


# The audio reader's errors (contract.errors) as the status a client gets; the message is kept.
_AUDIO_ERRORS: dict[type[contract_errors.AudioError], type[ServiceError]] = {
    contract_errors.UnsupportedAudio: UnsupportedMediaType,
    contract_errors.AudioTooLong: AudioTooLong,
    contract_errors.AudioTooLarge: AudioTooLarge,
    contract_errors.InvalidAudio: InvalidAudio,
}


def from_audio_error(e: contract_errors.AudioError) -> ServiceError:
    return _AUDIO_ERRORS.get(type(e), InvalidAudio)(str(e))


class ClientGone(Exception):
    """The client disconnected before its answer was ready; nobody is left to answer."""


_HTTP_CODES = {404: "not_found", 405: "method_not_allowed", 401: "unauthorized"}


def error_response(
    status: int, code: str, message: str, headers: dict | None = None
) -> JSONResponse:
    """The one /v1 error shape, with the request's ID (also in the header: an unhandled
    exception is answered outside the middleware that adds it to every other answer)."""
    body: dict = {"error": {"code": code, "message": message}}
    note_error(code)
    if (rid := current_request_id()) is not None:
        body["error"]["request_id"] = rid
        headers = {**(headers or {}), HEADER: rid}
    return JSONResponse(body, status_code=status, headers=headers)


async def _service_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, ServiceError)
    if exc.status >= 500 and not isinstance(exc, Overloaded | NotReady | DeadlineExceeded):
        return error_response(exc.status, "internal", "internal error")
    headers = dict(exc.headers)
    if exc.status == 503:  # overload and not-ready: tell clients when to come back
        headers.setdefault("Retry-After", str(request.app.state.settings.retry_after_s))
    if isinstance(exc, Overloaded):
        # Refused before its upload was read: close, so the client stops sending it. Kept
        # alive, the connection could serve the next request only once the unread body had been
        # received and parsed for nothing, and uvicorn pauses reading a body nobody consumes:
        # a large refused upload would leave the connection stuck instead.
        headers["Connection"] = "close"
    return error_response(exc.status, exc.code, exc.message, headers)


async def _http_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    code = _HTTP_CODES.get(exc.status_code, f"http_{exc.status_code}")
    message = exc.detail if isinstance(exc.detail, str) else "request failed"
    return error_response(exc.status_code, code, message, getattr(exc, "headers", None))


async def _validation_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    parts = [f"{'.'.join(str(x) for x in e['loc'])}: {e['msg']}" for e in exc.errors()]
    return error_response(422, "invalid_request", "; ".join(parts) or "invalid request")


async def _unhandled(request: Request, exc: Exception) -> JSONResponse:
    log.exception("unhandled error on %s %s", request.method, request.url.path)
    return error_response(500, "internal", "internal error")


def register_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(ServiceError, _service_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(Exception, _unhandled)


class BadRequest(ServiceError):
    status, code = 400, "bad_request"
