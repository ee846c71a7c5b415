"""The pure ASGI middleware (outermost) that gives every request its ID, its trace and its
access log line. Pure ASGI, like the metrics middleware: the routes keep the raw `receive`.

For each HTTP request: take or make the request ID (request_ids), return it in the
`X-Request-ID` response header of every answer (the error handlers also put it in the error
body, and answer unhandled exceptions outside this middleware with it, see service/errors.py),
count the body bytes, run the request span when tracing is on, and write the access line.
A WebSocket session gets its ID too, in the contextvar and in the accept message's headers.
"""

from __future__ import annotations

import time
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.observability import tracing
from service.observability.logs import log_access
from service.observability.request_ids import (
    HEADER_KEY,
    RequestInfo,
    accept_request_id,
    start_request,
)


def _given_id(scope: Scope) -> bytes | None:
    for key, value in scope["headers"]:
        if key == HEADER_KEY:
            return value
    return None


def _with_id(message: Message, rid: bytes) -> Message:
    """The response start (or WebSocket accept) with our header, unless already there."""
    headers = list(message.get("headers", []))
    if not any(k.lower() == HEADER_KEY for k, _ in headers):
        headers.append((HEADER_KEY, rid))
    return {**message, "headers": headers}


class ObservabilityMiddleware:
    def __init__(self, app: ASGIApp, access_log_sample: float = 1.0) -> None:
        self.app, self.sample = app, access_log_sample

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            await self._http(scope, receive, send)
        elif scope["type"] == "websocket":
            await self._websocket(scope, receive, send)
        else:
            await self.app(scope, receive, send)

    async def _http(self, scope: Scope, receive: Receive, send: Send) -> None:
        t0 = time.perf_counter()
        info = RequestInfo(accept_request_id(_given_id(scope)), scope["method"], scope["path"])
        start_request(info)
        rid = info.request_id.encode()
        trace = tracing.start_request(scope, info.request_id)

        async def receive_counted() -> Message:
            if trace is not None:
                trace.body_receive()
            message = await receive()
            if message["type"] == "http.request":
                info.bytes_in += len(message.get("body", b""))
                if trace is not None:
                    trace.body_received(info.bytes_in, not message.get("more_body", False))
            return message

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                info.status = message["status"]
                message = _with_id(message, rid)
            await send(message)

        try:
            await self.app(scope, receive_counted, send_with_id)
        except BaseException:
            # answered (500) by the error handler outside this middleware, or never (cancelled)
            info.status = info.status or 500
            info.error_code = info.error_code or "internal"
            raise
        finally:
            info.route = getattr(scope.get("route"), "path", None)
            trace_id = None
            if trace is not None:
                trace_id = trace.trace_id()
                trace.finish(_span_attributes(info), info.route, info.status or 500)
            log_access(info, time.perf_counter() - t0, self.sample, trace_id)

    async def _websocket(self, scope: Scope, receive: Receive, send: Send) -> None:
        info = RequestInfo(accept_request_id(_given_id(scope)), "WEBSOCKET", scope["path"])
        start_request(info)
        rid = info.request_id.encode()

        async def send_with_id(message: Message) -> None:
            if message["type"] == "websocket.accept":
                message = _with_id(message, rid)
            await send(message)

        await self.app(scope, receive, send_with_id)


def _span_attributes(info: RequestInfo) -> dict[str, Any]:
    return {
        "http.route": info.route,
        "esc50.model": info.model,
        "esc50.model_version": info.model_version,
        "esc50.bytes_in": info.bytes_in,
        "esc50.audio_s": info.audio_s,
        "esc50.windows": info.windows,
        "esc50.error_code": info.error_code,
    }
