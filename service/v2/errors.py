"""v2's error shape, `{"error": "<message>"}` with the protocol's status codes, for every
route of a v2 router (the /v1 routes keep `{"error": {"code", "message"}}`)."""

from __future__ import annotations

import logging
from collections.abc import Callable, Coroutine
from typing import Any

from fastapi import HTTPException, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.routing import APIRoute

from service.errors import ClientGone, NotReady, Overloaded, ServiceError

log = logging.getLogger(__name__)


def v2_error(status: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status, headers=headers)


def from_service_error(request: Request, e: ServiceError) -> JSONResponse:
    headers = dict(e.headers)
    if isinstance(e, Overloaded | NotReady):
        headers.setdefault("Retry-After", str(request.app.state.settings.retry_after_s))
    if e.status >= 500 and not isinstance(e, Overloaded | NotReady) and e.status != 504:
        return v2_error(e.status, "internal error", headers)
    return v2_error(e.status, e.message, headers)


class V2Route(APIRoute):
    """Routes whose errors leave in v2's shape (a route class, so the /v1 handlers stay)."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def handle(request: Request) -> Response:
            try:
                return await handler(request)
            except ServiceError as e:
                return from_service_error(request, e)
            except RequestValidationError as e:
                parts = [f"{'.'.join(map(str, x['loc']))}: {x['msg']}" for x in e.errors()]
                return v2_error(400, "; ".join(parts) or "invalid request")
            except HTTPException as e:
                return v2_error(e.status_code, str(e.detail), getattr(e, "headers", None))
            except ClientGone:
                raise
            except Exception:
                log.exception("unhandled error on %s %s", request.method, request.url.path)
                return v2_error(500, "internal error")

        return handle
