"""Request IDs, and what one request's access log line reports.

A request keeps the `X-Request-ID` its client or the load balancer sent when it is well formed
(1 to 128 characters from a set that is safe in a header, a log line and a trace attribute),
else it gets a new one. The middleware puts a `RequestInfo` in a contextvar for the request's
whole task; the routes, the error handlers and the log formatters read or add to it.
"""

from __future__ import annotations

import re
import uuid
from contextvars import ContextVar
from dataclasses import dataclass

HEADER = "X-Request-ID"
HEADER_KEY = HEADER.lower().encode()  # as ASGI spells header names
MAX_LENGTH = 128
# UUIDs, ULIDs, hex, base64 and HAProxy's ids pass; spaces, quotes, commas, control
# characters and non-ASCII do not (they would break a log line, a header or a search).
_WELL_FORMED = re.compile(rb"[A-Za-z0-9._:+/=@-]{1,%d}" % MAX_LENGTH)


def new_request_id() -> str:
    return uuid.uuid4().hex


def accept_request_id(given: bytes | None) -> str:
    """The given ID when well formed, else a new one."""
    if given is not None and _WELL_FORMED.fullmatch(given):
        return given.decode("ascii")
    return new_request_id()


@dataclass(slots=True)
class RequestInfo:
    """One request as its access log line and its trace report it."""

    request_id: str
    method: str
    path: str
    route: str | None = None  # the route template, once routed (bounded values)
    status: int | None = None
    bytes_in: int = 0  # request body bytes received
    model: str | None = None
    model_version: str | None = None
    audio_s: float | None = None  # decoded audio duration
    windows: int | None = None  # 5-s windows the audio was cut into
    error_code: str | None = None  # the /v1 error code of a failed answer


_current: ContextVar[RequestInfo | None] = ContextVar("esc50_request", default=None)


def start_request(info: RequestInfo) -> None:
    """Make `info` the current request of this task (the middleware calls it first thing).
    Never reset: each ASGI request runs in its own task, and the error handler that answers an
    unhandled exception runs outside the middleware, after it, and still needs the ID."""
    _current.set(info)


def current_request() -> RequestInfo | None:
    return _current.get()


def current_request_id() -> str | None:
    info = _current.get()
    return info.request_id if info is not None else None


def set_request_model(name: str, version: str) -> None:
    """The model version that answers the current request (called by the route once resolved)."""
    info = _current.get()
    if info is not None:
        info.model, info.model_version = name, version


def note_audio(duration_s: float, windows: int) -> None:
    """The decoded audio's duration and window count, for the access line and the trace."""
    info = _current.get()
    if info is not None:
        info.audio_s, info.windows = round(duration_s, 3), windows


def note_error(code: str) -> None:
    """The error code of the answer (called where the error body is built)."""
    info = _current.get()
    if info is not None:
        info.error_code = code
