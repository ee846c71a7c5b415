"""The Open Inference Protocol over HTTP (KServe v2 / Triton's REST API): health, metadata and
infer, translated onto the data plane in infer.py. Errors leave as `{"error": "..."}` (V2Route).

Health answers carry bodies and statuses both: tritonclient reads only the status, KServe's
client reads `{"live": true}` / `{"ready": true}`.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from starlette.requests import ClientDisconnect

from service.errors import ClientGone, Overloaded, PayloadTooLarge
from service.v2 import infer as plane
from service.v2.codec import HEADER_LENGTH, InferRequest, output_tensors, parse_rest, rest_response
from service.v2.errors import V2Route


async def server_metadata() -> dict[str, Any]:
    """Server name, version and the protocol extensions it speaks."""
    return plane.server_metadata()


async def live() -> JSONResponse:
    return JSONResponse({"live": True})


async def ready(request: Request) -> JSONResponse:
    is_ready = plane.server_ready(request.app.state)
    return JSONResponse({"ready": is_ready}, status_code=200 if is_ready else 503)


def _version(request: Request) -> str | None:
    """The path's version (the routes without /versions/{version} serve the default one)."""
    return request.path_params.get("version")


async def model_metadata(request: Request, name: str):
    """Inputs (an encoded-audio BYTES tensor, or FP32 waveforms) and outputs of a model."""
    return plane.model_metadata(request.app.state, name, _version(request))


async def model_ready(request: Request, name: str) -> JSONResponse:
    is_ready = plane.model_ready(request.app.state, name, _version(request))
    return JSONResponse({"name": name, "ready": is_ready}, status_code=200 if is_ready else 503)


async def model_infer(request: Request, name: str) -> Response:
    """Classify: `audio` BYTES [n] (encoded files) or `waveform` FP32 [n, 220500]; answers
    `probabilities` and `logits` FP32 [n, 50], with the classification and binary data
    extensions."""
    state = request.app.state
    plane.check_token(state.settings.api_token, request.headers.get("authorization"), "bearer")

    async def read(meta) -> InferRequest:
        body = await _read_body(request, state.settings.max_body_bytes)
        return parse_rest(body, request.headers.get(HEADER_LENGTH), meta)

    try:
        answer = await plane.infer(state, name, _version(request), read, request.receive)
    except Overloaded as e:
        # refused before its body was read: close, so the client stops sending it (as /v1)
        e.headers.setdefault("Connection", "close")
        raise
    tensors = output_tensors(answer.request, answer.values, answer.labels)
    body, header_length = rest_response(
        answer.model_name, answer.model_version, answer.request.id, tensors
    )
    if header_length is None:
        return Response(body, media_type="application/json")
    headers = {HEADER_LENGTH: str(header_length)}
    return Response(body, media_type="application/octet-stream", headers=headers)


async def _read_body(request: Request, limit: int) -> bytes:
    """The body, refused past `limit` bytes while it streams in (not after buffering it)."""
    declared = request.headers.get("content-length", "")
    too_large = PayloadTooLarge(f"the body exceeds the {limit}-byte limit", {"Connection": "close"})
    if declared.isdigit() and int(declared) > limit:
        raise too_large
    chunks, total = [], 0
    try:
        async for chunk in request.stream():
            total += len(chunk)
            if total > limit:
                raise too_large
            chunks.append(chunk)
    except ClientDisconnect:
        raise ClientGone from None
    return b"".join(chunks)


def v2_router() -> APIRouter:
    router = APIRouter(route_class=V2Route, tags=["v2 (Open Inference Protocol)"])
    router.add_api_route("/v2", server_metadata, methods=["GET"], summary="Server metadata")
    router.add_api_route("/v2/health/live", live, methods=["GET"], summary="Liveness")
    router.add_api_route("/v2/health/ready", ready, methods=["GET"], summary="Readiness")
    for prefix in ("/v2/models/{name}", "/v2/models/{name}/versions/{version}"):
        router.add_api_route(prefix, model_metadata, methods=["GET"], summary="Model metadata")
        router.add_api_route(f"{prefix}/ready", model_ready, methods=["GET"], summary="Ready?")
        router.add_api_route(f"{prefix}/infer", model_infer, methods=["POST"], summary="Infer")
    return router
