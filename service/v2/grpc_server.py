"""The Open Inference Protocol over gRPC: `inference.GRPCInferenceService`, on ESC50_GRPC_PORT
beside the HTTP port, on the same event loop, data plane (infer.py), batchers, limits, tokens
and per-version metrics as REST.

The messages are Triton's (tritonclient ships them generated: tritonclient.grpc.service_pb2).
Triton's service is a superset of KServe's grpc_predict_v2.proto with the same package,
service, method names and field numbers, so KServe's clients and tritonclient both speak to it;
of the superset this serves the repository RPCs too (index / load / unload, admin token).
Tokens travel as metadata: `authorization: Bearer <token>` (ESC50_API_TOKEN for ModelInfer,
ESC50_ADMIN_TOKEN for the repository RPCs). Errors: the HTTP status of the service's error as
its gRPC code (400 INVALID_ARGUMENT, 503 UNAVAILABLE with `retry-after` trailing metadata...).
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

import grpc
from fastapi import FastAPI
from tritonclient.grpc import model_config_pb2 as mc
from tritonclient.grpc import service_pb2 as pb
from tritonclient.grpc import service_pb2_grpc as pb_grpc

from service.errors import ServiceError
from service.observability.logs import log_access
from service.observability.request_ids import RequestInfo, accept_request_id, start_request
from service.repository import VersionPolicy
from service.v2 import infer as plane
from service.v2.codec import (
    BadTensor,
    InferRequest,
    output_tensors,
    raw_bytes,
    requested_output,
    tensor_from_raw,
    tensor_from_values,
)
from service.v2.control import BadControlRequest, ControlOff

log = logging.getLogger(__name__)

CODES = {
    400: grpc.StatusCode.INVALID_ARGUMENT,
    401: grpc.StatusCode.UNAUTHENTICATED,
    403: grpc.StatusCode.PERMISSION_DENIED,
    404: grpc.StatusCode.NOT_FOUND,
    409: grpc.StatusCode.FAILED_PRECONDITION,
    413: grpc.StatusCode.RESOURCE_EXHAUSTED,
    503: grpc.StatusCode.UNAVAILABLE,
    504: grpc.StatusCode.DEADLINE_EXCEEDED,
}
Handler = Callable[[Any, Any, grpc.aio.ServicerContext], Awaitable[Any]]


def _rpc(method: Handler) -> Handler:
    """A service error as its gRPC status (a 500 says "internal error" and logs the trace); the
    call's request ID (the caller's `x-request-id` metadata when well formed, else a new one)
    in the initial metadata and in the access line, as the HTTP routes do."""

    @functools.wraps(method)
    async def handle(self: Servicer, request: Any, context: grpc.aio.ServicerContext) -> Any:
        given = _metadata(context, "x-request-id")
        rid = accept_request_id(given.encode() if given else None)
        path = f"/inference.GRPCInferenceService/{method.__name__}"
        info = RequestInfo(rid, "GRPC", path, route=path, status=200)
        start_request(info)
        await context.send_initial_metadata((("x-request-id", rid),))
        t0 = time.perf_counter()

        def logged(status: int, code: str | None = None) -> None:
            info.status, info.error_code = status, code
            log_access(info, time.perf_counter() - t0, self._sample, None)

        try:
            answer = await method(self, request, context)
        except ServiceError as e:
            error = e
        except asyncio.CancelledError:
            logged(499)  # the caller went away
            raise
        except Exception:
            log.exception("unhandled error in %s", method.__name__)
            logged(500, "internal")
            await context.abort(grpc.StatusCode.INTERNAL, "internal error")
        else:
            logged(200)
            return answer
        logged(error.status, error.code)
        code = CODES.get(error.status, grpc.StatusCode.INTERNAL)
        message = error.message if code != grpc.StatusCode.INTERNAL else "internal error"
        trailers: tuple[tuple[str, str], ...] = (("x-request-id", rid),)
        if error.status == 503:
            trailers += (("retry-after", str(self.state.settings.retry_after_s)),)
        await context.abort(code, message, trailers)

    return handle


def _metadata(context: grpc.aio.ServicerContext, key: str) -> str | None:
    for k, value in context.invocation_metadata() or ():
        if k == key:
            return value if isinstance(value, str) else value.decode()
    return None


def _authorization(context: grpc.aio.ServicerContext) -> str | None:
    return _metadata(context, "authorization")


class Servicer(pb_grpc.GRPCInferenceServiceServicer):
    def __init__(self, state: Any) -> None:
        self.state = state  # the FastAPI app's state: settings, metrics, repository
        self._sample = state.settings.access_log_sample

    # --- health and metadata -------------------------------------------------------------

    async def ServerLive(self, request, context):
        return pb.ServerLiveResponse(live=True)

    async def ServerReady(self, request, context):
        return pb.ServerReadyResponse(ready=plane.server_ready(self.state))

    @_rpc
    async def ModelReady(self, request, context):
        ready = plane.model_ready(self.state, request.name, request.version or None)
        return pb.ModelReadyResponse(ready=ready)

    async def ServerMetadata(self, request, context):
        return pb.ServerMetadataResponse(**plane.server_metadata())

    @_rpc
    async def ModelMetadata(self, request, context):
        doc = plane.model_metadata(self.state, request.name, request.version or None)
        tensor = pb.ModelMetadataResponse.TensorMetadata
        return pb.ModelMetadataResponse(
            name=doc["name"],
            versions=doc["versions"],
            platform=doc["platform"],
            inputs=[tensor(**t) for t in doc["inputs"]],
            outputs=[tensor(**t) for t in doc["outputs"]],
        )

    @_rpc
    async def ModelConfig(self, request, context):
        """Enough of Triton's model config for a client to size its batches (the Triton
        backend of another replica reads max_batch_size)."""
        repository = plane.repository_of(self.state)
        mv = repository.get(request.name, request.version or None)
        classifier = mv.classifier
        assert classifier is not None
        meta, doc = classifier.meta, plane.model_metadata(self.state, mv.name, mv.version)
        classes = [len(meta.labels)]
        return pb.ModelConfigResponse(
            config=mc.ModelConfig(
                name=mv.name,
                platform=doc["platform"],
                max_batch_size=classifier.max_batch_size,
                input=[
                    mc.ModelInput(name="audio", data_type=mc.TYPE_STRING, dims=[1]),
                    mc.ModelInput(
                        name="waveform", data_type=mc.TYPE_FP32, dims=[meta.clip_samples]
                    ),
                ],
                output=[
                    mc.ModelOutput(name=t["name"], data_type=mc.TYPE_FP32, dims=classes)
                    for t in doc["outputs"]
                ],
            )
        )

    # --- infer ---------------------------------------------------------------------------

    @_rpc
    async def ModelInfer(self, request, context):
        settings = self.state.settings
        plane.check_token(settings.api_token, _authorization(context), "bearer")
        deadline = time.monotonic() + settings.request_timeout_s
        remaining = context.time_remaining()  # the client's own deadline, if it set one
        if remaining is not None:
            deadline = min(deadline, time.monotonic() + remaining)

        async def read(meta) -> InferRequest:
            return infer_request(request, meta)

        answer = await plane.infer(
            self.state,
            request.model_name,
            request.model_version or None,
            read,
            plane.never_gone,  # a client that goes cancels this task: the job is abandoned
            deadline,
        )
        tensors = output_tensors(answer.request, answer.values, answer.labels)
        out = pb.ModelInferResponse.InferOutputTensor
        return pb.ModelInferResponse(
            model_name=answer.model_name,
            model_version=answer.model_version,
            id=answer.request.id,
            outputs=[
                out(name=t.name, datatype=t.datatype, shape=list(t.shape)) for t, _ in tensors
            ],
            raw_output_contents=[raw_bytes(t) for t, _ in tensors],
        )

    # --- the model repository extension (Triton's), behind the admin token ----------------

    def _check_admin(self, context) -> None:
        settings = self.state.settings
        if settings.admin_token is None and not settings.control_open:
            raise ControlOff(
                "model control is off: set ESC50_ADMIN_TOKEN (or ESC50_CONTROL_OPEN=1)"
            )
        plane.check_token(settings.admin_token, _authorization(context), "admin")

    @_rpc
    async def RepositoryIndex(self, request, context):
        self._check_admin(context)
        rows = plane.repository_of(self.state).index()
        if request.ready:
            rows = [r for r in rows if r["state"] == "READY"]
        index = pb.RepositoryIndexResponse.ModelIndex
        return pb.RepositoryIndexResponse(models=[index(**r) for r in rows])

    @_rpc
    async def RepositoryModelLoad(self, request, context):
        self._check_admin(context)
        policy = None
        if "config" in request.parameters:
            try:
                config = json.loads(request.parameters["config"].string_param)
                policy = VersionPolicy.from_triton(config) if isinstance(config, dict) else None
            except (ValueError, KeyError, TypeError) as e:
                raise BadControlRequest(f"parameters.config: {e}") from None
        await plane.repository_of(self.state).load(request.model_name, policy)
        return pb.RepositoryModelLoadResponse()

    @_rpc
    async def RepositoryModelUnload(self, request, context):
        self._check_admin(context)
        await plane.repository_of(self.state).unload(request.model_name)
        return pb.RepositoryModelUnloadResponse()


def infer_request(request: Any, meta) -> InferRequest:
    """A ModelInferRequest as the codec's InferRequest: its one input from raw_input_contents
    (what tritonclient sends) or from `contents`, with the same checks as REST."""
    if len(request.inputs) != 1:
        raise BadTensor("a request must hold exactly one input: 'audio' (BYTES) or 'waveform'")
    i = request.inputs[0]
    shape = list(i.shape)
    if request.raw_input_contents:
        if len(request.raw_input_contents) != 1:
            raise BadTensor("raw_input_contents must hold one entry per input")
        tensor = tensor_from_raw(i.name, i.datatype, shape, request.raw_input_contents[0], meta)
    else:
        values = i.contents.bytes_contents if i.datatype == "BYTES" else i.contents.fp32_contents
        tensor = tensor_from_values(i.name, i.datatype, shape, list(values), meta)
    outputs = []
    for o in request.outputs:
        k = o.parameters["classification"].int64_param if "classification" in o.parameters else 0
        outputs.append(requested_output(o.name, int(k)))
    return InferRequest(input=tensor, outputs=tuple(outputs), id=request.id)


# --- lifecycle (the app's lifespan) ----------------------------------------------------------


async def start_grpc(app: FastAPI) -> None:
    """Serve gRPC on ESC50_HOST:ESC50_GRPC_PORT (0: off). A port that cannot be bound stops
    the start, with the address."""
    app.state.grpc_server = None
    settings = app.state.settings
    if settings.grpc_port == 0:
        return
    limit = settings.max_body_bytes  # the same byte limit as an HTTP body
    server = grpc.aio.server(
        options=[
            ("grpc.max_receive_message_length", limit),
            ("grpc.max_send_message_length", limit),
        ]
    )
    pb_grpc.add_GRPCInferenceServiceServicer_to_server(Servicer(app.state), server)
    host = f"[{settings.host}]" if ":" in settings.host else settings.host
    address = f"{host}:{settings.grpc_port}"
    try:
        server.add_insecure_port(address)
    except RuntimeError as e:
        raise RuntimeError(f"cannot serve gRPC on {address} (ESC50_GRPC_PORT): {e}") from None
    await server.start()
    app.state.grpc_server = server
    log.info("v2 gRPC on %s", address)


async def stop_grpc(app: FastAPI) -> None:
    """Stop taking RPCs; those running get up to ESC50_DRAIN_TIMEOUT_S to finish."""
    server: grpc.aio.Server | None = getattr(app.state, "grpc_server", None)
    if server is not None:
        await server.stop(app.state.settings.drain_timeout_s)
        app.state.grpc_server = None
