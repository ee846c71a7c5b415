"""Triton's model-repository extension: index, load and unload, behind the admin token.

`tritonclient`'s get_model_repository_index / load_model / unload_model speak it. A load's
body may carry `{"parameters": {"config": "<ModelConfig JSON>"}}` (what load_model(config=...)
sends); its `version_policy` applies to that load, e.g. {"version_policy": {"specific":
{"versions": [1]}}} rolls back to version 1.
"""

from __future__ import annotations

import hmac
import json
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from service.errors import NotReady, ServiceError, Unauthorized
from service.repository import ModelRepository, VersionPolicy
from service.settings import Settings
from service.v2.errors import V2Route


class ControlOff(ServiceError):
    status, code = 403, "control_off"


class BadControlRequest(ServiceError):
    status, code = 400, "bad_request"


def check_admin(request: Request) -> None:
    """The admin token (not the inference token); control is off while it is unset, unless
    ESC50_CONTROL_OPEN opens it for local use."""
    settings: Settings = request.app.state.settings
    token = settings.admin_token
    if token is None:
        if settings.control_open:
            return
        raise ControlOff("model control is off: set ESC50_ADMIN_TOKEN (or ESC50_CONTROL_OPEN=1)")
    given = request.headers.get("authorization", "").removeprefix("Bearer ").encode()
    if not hmac.compare_digest(given, token.get_secret_value().encode()):
        raise Unauthorized("missing or wrong admin token", {"WWW-Authenticate": "Bearer"})


def _repository(request: Request) -> ModelRepository:
    repository: ModelRepository | None = request.app.state.repository
    if repository is None:
        raise NotReady("the model repository is opening")
    return repository


async def _body(request: Request) -> dict[str, Any]:
    raw = await request.body()
    if not raw.strip():
        return {}
    try:
        doc = json.loads(raw)
    except ValueError:
        raise BadControlRequest("the body is not JSON") from None
    if not isinstance(doc, dict):
        raise BadControlRequest("the body must be a JSON object")
    return doc


def _load_policy(doc: dict[str, Any]) -> VersionPolicy | None:
    params = doc.get("parameters") or {}
    config = params.get("config") if isinstance(params, dict) else None
    if config is None:
        return None
    try:
        parsed = json.loads(config) if isinstance(config, str) else config
        return VersionPolicy.from_triton(parsed) if isinstance(parsed, dict) else None
    except (ValueError, KeyError, TypeError) as e:
        raise BadControlRequest(f"parameters.config: {e}") from None


async def index(request: Request) -> JSONResponse:
    """Every model in the repository with its versions' states (READY, LOADING, UNLOADING,
    UNAVAILABLE + reason); `{"ready": true}` lists the ready ones only."""
    check_admin(request)
    doc = await _body(request)
    rows = _repository(request).index()
    if doc.get("ready"):
        rows = [r for r in rows if r["state"] == "READY"]
    return JSONResponse(rows)


async def load(request: Request, name: str) -> Response:
    """Load (or reload) a model under its version policy: new versions load and warm off the
    request path, then traffic switches; versions the policy drops drain and unload."""
    check_admin(request)
    policy = _load_policy(await _body(request))
    await _repository(request).load(name, policy)
    return JSONResponse({})


async def unload(request: Request, name: str) -> Response:
    """Take every version of a model out of service; each drains, then unloads."""
    check_admin(request)
    await _body(request)
    await _repository(request).unload(name)
    return JSONResponse({})


def control_router(settings: Settings) -> APIRouter:
    router = APIRouter(route_class=V2Route, tags=["model repository"])
    router.add_api_route("/v2/repository/index", index, methods=["POST"])
    router.add_api_route("/v2/repository/models/{name}/load", load, methods=["POST"])
    router.add_api_route("/v2/repository/models/{name}/unload", unload, methods=["POST"])
    return router
