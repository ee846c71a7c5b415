"""HTTP layer: the app factory, its lifespan, the routes and the metrics middleware."""

from __future__ import annotations

import asyncio
import hmac
import importlib.resources
import logging
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Annotated, Any

from fastapi import APIRouter, Depends, FastAPI, Query, Request
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.staticfiles import StaticFiles
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from contract.metadata import MetadataError
from service.artifacts import ModelNotFound, resolve_model_path
from service.backends import Backend, BackendUnavailable, load_backend, warmup
from service.classifier import Classifier
from service.errors import (
    ClientGone,
    NotReady,
    Unauthorized,
    error_response,
    register_error_handlers,
)
from service.explain import Explainer
from service.metrics import Metrics
from service.schemas import ClassifyResponse, ErrorResponse, ExplainResponse, ModelList, Status
from service.settings import Settings
from service.upload import AUDIO_MEDIA_TYPES, MULTIPART, read_audio_bytes

log = logging.getLogger("service")

BackendLoader = Callable[[Settings, Path], Backend]
STARTUP_ERRORS = (MetadataError, BackendUnavailable, ModelNotFound)


# --- lifespan --------------------------------------------------------------------------------


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    """Load (refusing a bad artifact before serving), start the batcher, warm up in the
    background (/readyz says 503 until done), and drain on shutdown."""
    settings: Settings = app.state.settings
    try:
        path = resolve_model_path(settings)
        backend = await asyncio.to_thread(app.state.backend_loader, settings, path)
    except STARTUP_ERRORS as e:
        log.error("cannot serve: %s", e)
        raise
    classifier = Classifier(backend, settings, app.state.metrics)
    app.state.classifier = classifier
    _publish_model_info(app.state.metrics, classifier, path)
    classifier.start()
    app.state.explainer = Explainer(settings)  # loads its artifact on the first /v1/explain
    warming = asyncio.create_task(_warm(app, classifier))
    try:
        yield
    finally:
        _set_ready(app, False)
        await asyncio.wait({warming})
        await asyncio.to_thread(classifier.stop)  # drain: queued requests still get answers
        await asyncio.to_thread(app.state.explainer.close)
        backend.close()
        log.info("stopped")


async def _warm(app: FastAPI, classifier: Classifier) -> None:
    if app.state.settings.warmup:
        t0 = time.perf_counter()
        try:
            sizes = [1, classifier.max_batch_size]
            await asyncio.to_thread(warmup, classifier.backend, sizes)
        except Exception:
            log.exception("warm-up failed; /readyz stays 503")
            return
        log.info("warmed up batch sizes %s in %.2f s", sizes, time.perf_counter() - t0)
    _set_ready(app, True)


def _set_ready(app: FastAPI, ready: bool) -> None:
    app.state.ready = ready
    app.state.metrics.ready.set(int(ready))


def _publish_model_info(metrics: Metrics, c: Classifier, path: Path) -> None:
    m = c.meta
    metrics.model_info.info(
        {
            "name": m.model_name,
            "version": m.model_version,
            "variant": m.variant,
            "backend": c.backend.name,
            "provider": c.backend.provider,
            "path": path.name,
        }
    )
    log.info(
        "serving %s %s (%s) with %s/%s",
        m.model_name,
        m.model_version,
        m.variant,
        c.backend.name,
        c.backend.provider,
    )


# --- dependencies ----------------------------------------------------------------------------

# Attached to the inference routes only where ESC50_API_TOKEN is set (`build_router`), so the
# OpenAPI document declares bearer auth exactly when the running configuration enforces it.
_bearer = HTTPBearer(auto_error=False, description="the token this service's ESC50_API_TOKEN sets")


def ready_classifier(request: Request) -> Classifier:
    if not request.app.state.ready:
        retry = str(request.app.state.settings.retry_after_s)
        raise NotReady("the model is loading or warming up", headers={"Retry-After": retry})
    classifier: Classifier = request.app.state.classifier
    return classifier


def check_token(
    request: Request, creds: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]
) -> None:
    token = request.app.state.settings.api_token
    if token is None:
        return
    given = creds.credentials.encode() if creds else b""
    if not hmac.compare_digest(given, token.get_secret_value().encode()):
        raise Unauthorized("missing or wrong bearer token", headers={"WWW-Authenticate": "Bearer"})


ClassifierDep = Annotated[Classifier, Depends(ready_classifier)]


# --- routes ----------------------------------------------------------------------------------

_BINARY = {"schema": {"type": "string", "format": "binary"}}
_REQUEST_BODY = {
    "requestBody": {
        "required": True,
        "description": "the audio file's bytes, or multipart/form-data with a `file` field",
        "content": {
            **{t: _BINARY for t in sorted(AUDIO_MEDIA_TYPES)},
            MULTIPART: {
                "schema": {
                    "type": "object",
                    "properties": {"file": {"type": "string", "format": "binary"}},
                    "required": ["file"],
                }
            },
        },
    }
}
_ERRORS: dict[int | str, dict[str, Any]] = {
    s: {"model": ErrorResponse, "description": d}
    for s, d in {
        400: "empty body or malformed multipart",
        401: "bearer token missing or wrong",
        413: "upload over the byte limit, or audio over the duration limit",
        415: "not decodable audio, or a wrong Content-Type",
        422: "NaN/Inf samples or bad query",
        503: "queue full or not ready (Retry-After)",
        504: "deadline passed",
    }.items()
}


async def classify(
    request: Request,
    classifier: ClassifierDep,
    top_k: Annotated[int | None, Query(ge=1, le=1000, description="how many labels")] = None,
) -> ClassifyResponse:
    """Classify an audio clip. Audio longer than 5 s is scored in windows (mean probability)."""
    settings: Settings = request.app.state.settings
    deadline = time.monotonic() + settings.request_timeout_s
    with request.app.state.metrics.in_flight.track_inprogress():
        # A place in the queue before the body is read: a refused request (503 + Retry-After)
        # costs no upload buffering, no decode and no resample.
        admission = classifier.admit()
        try:
            data = await read_audio_bytes(request, settings.max_body_bytes)
            k = top_k or settings.default_top_k
            return await classifier.classify(data, k, deadline, request.receive, admission)
        finally:
            admission.release()


async def explain(
    request: Request,
    classifier: ClassifierDep,
    top_k: Annotated[int | None, Query(ge=1, le=1000, description="how many labels")] = None,
) -> ExplainResponse:
    """Classify an audio clip and show why: per window, the log-mel the model saw, each stage's
    feature maps and the top label's class activation map (fp32 explain artifact, loaded on the
    first request; up to ESC50_EXPLAIN_MAX_DURATION_S of audio)."""
    settings: Settings = request.app.state.settings
    deadline = time.monotonic() + settings.request_timeout_s
    explainer: Explainer = request.app.state.explainer
    with request.app.state.metrics.in_flight.track_inprogress():
        # A place among explain requests before the body is read, as in `classify`: a refused
        # request (503 + Retry-After) costs no upload buffering and no decode.
        admission = explainer.admit()
        try:
            data = await read_audio_bytes(request, settings.max_body_bytes)
            k = top_k or settings.default_top_k
            return await explainer.explain(classifier, data, k, deadline, admission)
        finally:
            admission.release()  # a no-op once the explain pool holds the place


_EXPLAIN_503 = "no explain artifact (`make export`), explain queue full, or not ready"
_EXPLAIN_ERRORS = {**_ERRORS, 503: {"model": ErrorResponse, "description": _EXPLAIN_503}}


def build_router(require_token: bool) -> APIRouter:
    """The inference routes; with `require_token` they check (and declare) the bearer token."""
    guard = [Depends(check_token)] if require_token else []
    errors = _ERRORS if require_token else {s: e for s, e in _ERRORS.items() if s != 401}
    explain_errors = {**errors, 503: _EXPLAIN_ERRORS[503]}
    router = APIRouter()
    for path in ("/v1/classify", "/classify"):
        router.add_api_route(
            path,
            classify,
            methods=["POST"],
            response_model=ClassifyResponse,
            tags=["classify"],
            dependencies=guard,
            responses=errors,
            openapi_extra=_REQUEST_BODY,
            summary="Classify audio" + (" (alias of /v1/classify)" if path == "/classify" else ""),
        )
    router.add_api_route(
        "/v1/explain",
        explain,
        methods=["POST"],
        response_model=ExplainResponse,
        tags=["explain"],
        dependencies=guard,
        responses=explain_errors,
        openapi_extra=_REQUEST_BODY,
        summary="Classify and explain audio",
    )
    return router


# --- the page and the docs (static files shipped in the package; no CDN) ---------------------

STATIC = Path(__file__).resolve().parent / "static"
pages = APIRouter(include_in_schema=False)


@pages.get("/")
async def page() -> FileResponse:
    return FileResponse(STATIC / "index.html")


@pages.get("/docs")
async def docs(request: Request) -> HTMLResponse:
    root = request.scope.get("root_path", "")
    return get_swagger_ui_html(
        openapi_url=f"{root}{request.app.openapi_url}",
        title=f"{request.app.title} - API docs",
        swagger_js_url=f"{root}/docs-assets/swagger-ui-bundle.js",
        swagger_css_url=f"{root}/docs-assets/swagger-ui.css",
        swagger_favicon_url=f"{root}/static/favicon.svg",
    )


def swagger_assets() -> Path:
    """Swagger UI's JS and CSS as the fastapi-offline package ships them (FastAPI's default
    /docs loads them from a CDN and renders blank offline)."""
    return Path(str(importlib.resources.files("fastapi_offline") / "static"))


probes = APIRouter(tags=["probes"])


@probes.get("/healthz", response_model=Status)
async def healthz() -> Status:
    """Liveness: the process answers."""
    return Status(status="ok")


@probes.get("/readyz", response_model=Status, responses={503: {"model": ErrorResponse}})
async def readyz(request: Request) -> Response:
    """Readiness: 200 once the model is loaded and warmed up, 503 before and while draining."""
    if request.app.state.ready:
        return JSONResponse({"status": "ready"})
    retry = {"Retry-After": str(request.app.state.settings.retry_after_s)}
    return error_response(503, "not_ready", "the model is loading or warming up", retry)


@probes.get("/metrics", include_in_schema=False)
async def metrics(request: Request) -> Response:
    return Response(
        generate_latest(request.app.state.metrics.registry), media_type=CONTENT_TYPE_LATEST
    )


@probes.get("/v1/models", response_model=ModelList, tags=["models"])
async def models(classifier: ClassifierDep) -> ModelList:
    """The served model: name, version, labels, front-end config, backend and provider."""
    return ModelList(models=[classifier.card()])


# --- middleware ------------------------------------------------------------------------------


class MetricsMiddleware:
    """Counts every response by route template (not raw path: bounded label values) and status,
    and times it. Pure ASGI, so the classify route keeps the raw `receive` for disconnects."""

    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app, self.metrics = app, metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status, t0 = 500, time.perf_counter()

        async def send_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            route = getattr(scope.get("route"), "path", "unmatched")
            self.metrics.requests.labels(route, scope["method"], str(status)).inc()
            self.metrics.request_latency.labels(route).observe(time.perf_counter() - t0)


async def _client_gone(request: Request, exc: Exception) -> Response:
    return Response(status_code=499)  # nginx's "client closed request"; nobody reads it


# --- factory ---------------------------------------------------------------------------------


def create_app(
    settings: Settings | None = None, backend_loader: BackendLoader | None = None
) -> FastAPI:
    """Build the app. Nothing is loaded here: the lifespan loads the model when serving starts."""
    settings = settings or Settings()
    app = FastAPI(
        title="ESC-50 audio classification",
        version="1",
        lifespan=lifespan,
        description="Classify environmental sounds (ESC-50's 50 classes) with dynamic batching. "
        "[The page](/) classifies and explains a clip in the browser.",
        docs_url=None,  # served by `docs` from local assets
        redoc_url=None,
    )
    app.state.settings = settings
    app.state.metrics = Metrics()
    app.state.backend_loader = backend_loader or load_backend
    app.state.classifier = None
    app.state.ready = False
    app.state.explainer = None
    register_error_handlers(app)
    app.add_exception_handler(ClientGone, _client_gone)
    app.add_middleware(MetricsMiddleware, metrics=app.state.metrics)
    app.include_router(build_router(require_token=settings.api_token is not None))
    app.include_router(probes)
    app.include_router(pages)
    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    app.mount("/docs-assets", StaticFiles(directory=swagger_assets()), name="docs-assets")
    return app
