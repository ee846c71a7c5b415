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
from prometheus_client.exposition import choose_encoder
from starlette.staticfiles import StaticFiles
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from contract.metadata import MetadataError
from service.artifacts import ModelNotFound
from service.backends import Backend, BackendUnavailable, load_backend
from service.classifier import Classifier
from service.errors import (
    ClientGone,
    NotReady,
    Unauthorized,
    error_response,
    register_error_handlers,
)
from service.explain import ExplainUnavailable
from service.metrics import Metrics
from service.observability import tracing
from service.observability.middleware import ObservabilityMiddleware
from service.observability.request_ids import set_request_model
from service.outcome import version_outcome
from service.repository import LoadFailed, ModelRepository
from service.schemas import ClassifyResponse, ErrorResponse, ExplainResponse, ModelList, Status
from service.settings import Settings
from service.streams import attach_streams
from service.upload import AUDIO_MEDIA_TYPES, MULTIPART, read_audio_bytes
from service.v2.control import control_router
from service.v2.grpc_server import start_grpc, stop_grpc
from service.v2.rest import v2_router

log = logging.getLogger("service")

BackendLoader = Callable[[Settings, Path], Backend]
STARTUP_ERRORS = (MetadataError, BackendUnavailable, ModelNotFound, LoadFailed)


# --- lifespan --------------------------------------------------------------------------------


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    """Open the repository's start-up models (a broken default model stops the start), warm
    them in the background (/readyz says 503 until the default model answers), and drain on
    shutdown: every version finishes what it accepted, then unloads."""
    settings: Settings = app.state.settings
    try:
        repository = ModelRepository(settings, app.state.metrics, app.state.backend_loader)
        await repository.start()
    except STARTUP_ERRORS as e:
        log.error("cannot serve: %s", e)
        raise
    app.state.repository = repository
    app.state.accepting = True
    poller = asyncio.create_task(repository.poll()) if settings.repository_poll_s > 0 else None
    try:
        await start_grpc(app)  # v2 gRPC on ESC50_GRPC_PORT (0: off)
        yield
    finally:
        app.state.accepting = False
        await stop_grpc(app)
        if poller is not None:
            poller.cancel()
        streams = getattr(app.state, "streams", None)
        if streams is not None:  # open streams get a final event and a reconnect close code
            await streams.close_all()
        await repository.close()
        log.info("stopped")


def is_ready(app: FastAPI) -> bool:
    repository: ModelRepository | None = app.state.repository
    return bool(app.state.accepting and repository is not None and repository.is_ready())


# --- dependencies ----------------------------------------------------------------------------

# Attached to the inference routes only where ESC50_API_TOKEN is set (`build_router`), so the
# OpenAPI document declares bearer auth exactly when the running configuration enforces it.
_bearer = HTTPBearer(auto_error=False, description="the token this service's ESC50_API_TOKEN sets")


def serving_repository(request: Request) -> ModelRepository:
    """The repository, once the service takes requests (503 while starting or draining; each
    route's model then answers for itself: 404 unknown, 503 not loaded)."""
    repository_or_none: ModelRepository | None = request.app.state.repository
    if not request.app.state.accepting or repository_or_none is None or repository_or_none.starting:
        retry = str(request.app.state.settings.retry_after_s)
        raise NotReady("the model is loading or warming up", headers={"Retry-After": retry})
    repository: ModelRepository = request.app.state.repository
    return repository


def ready_classifier(request: Request) -> Classifier:
    """The default model's default version (for callers that need no lease)."""
    classifier = serving_repository(request).get().classifier
    assert classifier is not None
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


RepositoryDep = Annotated[ModelRepository, Depends(serving_repository)]


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


TopK = Annotated[int | None, Query(ge=1, le=1000, description="how many labels")]


async def _classify(
    request: Request, repository: ModelRepository, name: str | None, version: str | None, k: TopK
) -> ClassifyResponse:
    settings: Settings = request.app.state.settings
    deadline = time.monotonic() + settings.request_timeout_s
    metrics: Metrics = request.app.state.metrics
    with metrics.in_flight.track_inprogress(), repository.lease(name, version) as mv:
        classifier = mv.classifier
        set_request_model(mv.name, mv.version)
        assert classifier is not None
        with version_outcome(classifier):
            # A place in the queue before the body is read: a refused request (503 +
            # Retry-After) costs no upload buffering, no decode and no resample.
            admission = classifier.admit()
            try:
                data = await read_audio_bytes(request, settings.max_body_bytes)
                top_k = k or settings.default_top_k
                return await classifier.classify(data, top_k, deadline, request.receive, admission)
            finally:
                admission.release()


async def classify(request: Request, repository: RepositoryDep, top_k: TopK = None):
    """Classify an audio clip with the default model's default version. Audio longer than 5 s is
    scored in windows (mean probability)."""
    return await _classify(request, repository, None, None, top_k)


async def classify_model(
    request: Request, repository: RepositoryDep, name: str, top_k: TopK = None
):
    """Classify an audio clip with model `name`'s default version."""
    return await _classify(request, repository, name, None, top_k)


async def classify_version(
    request: Request, repository: RepositoryDep, name: str, version: str, top_k: TopK = None
):
    """Classify an audio clip with one version of model `name`."""
    return await _classify(request, repository, name, version, top_k)


async def _explain(
    request: Request, repository: ModelRepository, name: str | None, version: str | None, k: TopK
) -> ExplainResponse:
    settings: Settings = request.app.state.settings
    deadline = time.monotonic() + settings.request_timeout_s
    with (
        request.app.state.metrics.in_flight.track_inprogress(),
        repository.lease(name, version) as mv,
    ):
        explainer, classifier = mv.explainer, mv.classifier
        set_request_model(mv.name, mv.version)
        assert classifier is not None
        if explainer is None:
            raise ExplainUnavailable(
                f"{mv.name} version {mv.version} has no explain.onnx in its folder; "
                "/v1/classify still works"
            )
        # A place among explain requests before the body is read, as in `classify`: a refused
        # request (503 + Retry-After) costs no upload buffering and no decode.
        admission = explainer.admit()
        try:
            data = await read_audio_bytes(request, settings.max_body_bytes)
            top_k = k or settings.default_top_k
            return await explainer.explain(classifier, data, top_k, deadline, admission)
        finally:
            admission.release()  # a no-op once the explain pool holds the place


async def explain(request: Request, repository: RepositoryDep, top_k: TopK = None):
    """Classify an audio clip and show why: per window, the log-mel the model saw, each stage's
    feature maps and the top label's class activation map (fp32 explain artifact, loaded on the
    first request; up to ESC50_EXPLAIN_MAX_DURATION_S of audio)."""
    return await _explain(request, repository, None, None, top_k)


async def explain_model(request: Request, repository: RepositoryDep, name: str, top_k: TopK = None):
    """Explain with model `name`'s default version."""
    return await _explain(request, repository, name, None, top_k)


async def explain_version(
    request: Request, repository: RepositoryDep, name: str, version: str, top_k: TopK = None
):
    """Explain with one version of model `name`."""
    return await _explain(request, repository, name, version, top_k)


_EXPLAIN_503 = "no explain artifact (`make export`), explain queue full, or not ready"
_EXPLAIN_ERRORS = {**_ERRORS, 503: {"model": ErrorResponse, "description": _EXPLAIN_503}}


def build_router(require_token: bool) -> APIRouter:
    """The inference routes; with `require_token` they check (and declare) the bearer token."""
    guard = [Depends(check_token)] if require_token else []
    errors = _ERRORS if require_token else {s: e for s, e in _ERRORS.items() if s != 401}
    explain_errors = {**errors, 503: _EXPLAIN_ERRORS[503]}
    router = APIRouter()
    V = "/v1/models/{name}/versions/{version}"
    routes: list[tuple[str, Callable[..., Any], str, str]] = [  # path, endpoint, tag, summary
        ("/v1/classify", classify, "classify", "Classify audio (the default model)"),
        ("/classify", classify, "classify", "Classify audio (alias of /v1/classify)"),
        ("/v1/models/{name}/classify", classify_model, "classify", "Classify with a model"),
        (f"{V}/classify", classify_version, "classify", "Classify with a model version"),
        ("/v1/explain", explain, "explain", "Classify and explain audio"),
        ("/v1/models/{name}/explain", explain_model, "explain", "Explain with a model"),
        (f"{V}/explain", explain_version, "explain", "Explain with a model version"),
    ]
    for path, endpoint, tag, summary in routes:
        router.add_api_route(
            path,
            endpoint,
            methods=["POST"],
            response_model=ClassifyResponse if tag == "classify" else ExplainResponse,
            tags=[tag],
            dependencies=guard,
            responses=errors if tag == "classify" else explain_errors,
            openapi_extra=_REQUEST_BODY,
            summary=summary,
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
    """Readiness: 200 once the default model is loaded and warmed, 503 before and while draining."""
    if is_ready(request.app):
        return JSONResponse({"status": "ready"})
    retry = {"Retry-After": str(request.app.state.settings.retry_after_s)}
    return error_response(503, "not_ready", "the model is loading or warming up", retry)


@probes.get("/metrics", include_in_schema=False)
async def metrics(request: Request) -> Response:
    # OpenMetrics when asked (Prometheus asks): the only format that carries exemplars
    encoder, content_type = choose_encoder(request.headers.get("accept", ""))
    return Response(encoder(request.app.state.metrics.registry), media_type=content_type)


@probes.get("/v1/models", response_model=ModelList, tags=["models"])
async def models(request: Request) -> ModelList:
    """Every loaded model version (name, version, labels, front-end, backend, memory) and the
    versions loading, unloading or failed, with the reason."""
    repository: ModelRepository | None = request.app.state.repository
    if repository is None:
        raise NotReady("the model repository is opening")
    return repository.model_list()


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
            latency = time.perf_counter() - t0
            self.metrics.request_latency.labels(route).observe(latency, tracing.exemplar())


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
    app.state.repository = None
    app.state.accepting = False
    app.state.metrics.ready.set_function(lambda: int(is_ready(app)))
    register_error_handlers(app)
    app.add_exception_handler(ClientGone, _client_gone)
    app.add_middleware(MetricsMiddleware, metrics=app.state.metrics)
    # outermost (added last): request IDs, the request's trace, the access log line
    app.add_middleware(ObservabilityMiddleware, access_log_sample=settings.access_log_sample)
    app.include_router(build_router(require_token=settings.api_token is not None))
    app.include_router(probes)
    app.include_router(control_router(settings))
    app.include_router(v2_router())
    app.include_router(pages)
    attach_streams(app)  # WS /v1/stream and app.state.streams (service/streams.py)
    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    app.mount("/docs-assets", StaticFiles(directory=swagger_assets()), name="docs-assets")
    return app
