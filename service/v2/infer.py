"""The one data plane under both v2 front doors (REST: rest.py, gRPC: grpc_server.py): health,
metadata and infer over the model repository and the classify pipeline. The front doors only
translate their wire types.

An infer request goes the way a /v1/classify request goes: a lease on the model version, a
place in its batcher's queue taken *before* the tensors are read (an overloaded version answers
503 + Retry-After without decoding anything), encoded audio decoded in the version's decode pool
(`Classifier.prepare`, the same windows), all the request's windows submitted as one job to the
version's batcher, its deadline and its client watched, the answer counted on the version.
"""

from __future__ import annotations

import asyncio
import hmac
import importlib.metadata
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
from pydantic import SecretStr

from contract.metadata import ArtifactMetadata
from service.classifier import Classifier, Prepared, Receive, softmax, wait_for_logits
from service.errors import DeadlineExceeded, NotReady, ServiceError, Unauthorized
from service.observability import tracing
from service.observability.request_ids import set_request_model
from service.outcome import version_outcome
from service.repository import ModelRepository
from service.v2.codec import (
    LOGITS,
    PROBABILITIES,
    BadTensor,
    InferRequest,
    Tensor,
    input_metadata,
    output_metadata,
)

EXTENSIONS = ["classification", "binary_tensor_data", "model_repository"]
# Triton's platform names for what runs the graph
PLATFORMS = {"onnxruntime": "onnxruntime_onnx", "tensorrt": "tensorrt_plan", "triton": "triton"}

ReadRequest = Callable[[ArtifactMetadata], Awaitable[InferRequest]]


@dataclass(frozen=True)
class Answer:
    model_name: str
    model_version: str
    request: InferRequest
    values: dict[str, np.ndarray]  # every output, (n, classes) float32
    labels: list[str]


# --- server and model state ------------------------------------------------------------------


def server_metadata() -> dict[str, Any]:
    try:
        version = importlib.metadata.version("esc50-serve")
    except importlib.metadata.PackageNotFoundError:
        version = "0"
    return {"name": "esc50-serve", "version": version, "extensions": EXTENSIONS}


def server_ready(state: Any) -> bool:
    """Ready: serving, and the default model answers (the same as /readyz)."""
    repository: ModelRepository | None = state.repository
    return bool(state.accepting and repository is not None and repository.is_ready())


def repository_of(state: Any) -> ModelRepository:
    """The repository, once the service takes requests (503 while starting or draining)."""
    repository: ModelRepository | None = state.repository
    if not state.accepting or repository is None:
        retry = {"Retry-After": str(state.settings.retry_after_s)}
        raise NotReady("the service is starting or draining", retry)
    return repository


def model_ready(state: Any, name: str, version: str | None) -> bool:
    """True if the version answers; False while it loads or after it failed; 404 if unknown."""
    try:
        repository_of(state).get(name, version or None)
    except NotReady:
        return False
    return True


def model_metadata(state: Any, name: str, version: str | None) -> dict[str, Any]:
    repository = repository_of(state)
    mv = repository.get(name, version or None)
    classifier = mv.classifier
    assert classifier is not None
    meta = classifier.meta
    return {
        "name": mv.name,
        "versions": sorted(repository.serving.get(mv.name, {}), key=int),
        "platform": PLATFORMS.get(classifier.backend.name, classifier.backend.name),
        "inputs": input_metadata(meta),
        "outputs": output_metadata(meta),
    }


def check_token(expected: SecretStr | None, authorization: str | None, what: str) -> None:
    """`authorization: Bearer <token>` (an HTTP header or gRPC metadata) against a token;
    nothing to check where the token is unset."""
    if expected is None:
        return
    given = (authorization or "").removeprefix("Bearer ").encode()
    if not hmac.compare_digest(given, expected.get_secret_value().encode()):
        raise Unauthorized(f"missing or wrong {what} token", {"WWW-Authenticate": "Bearer"})


# --- infer -----------------------------------------------------------------------------------


async def infer(
    state: Any,
    name: str,
    version: str | None,
    read: ReadRequest,
    receive: Receive,
    deadline: float | None = None,
) -> Answer:
    """Run one infer request on `name` (version: None = its default). `read` parses the
    request's tensors once a place in the queue is held; `receive` reports the client gone (an
    ASGI receive); `deadline` (monotonic) defaults to ESC50_REQUEST_TIMEOUT_S from now."""
    settings = state.settings
    deadline = deadline or time.monotonic() + settings.request_timeout_s
    repository = repository_of(state)
    with state.metrics.in_flight.track_inprogress(), repository.lease(name, version) as mv:
        classifier = mv.classifier
        assert classifier is not None
        set_request_model(mv.name, mv.version)
        with version_outcome(classifier):
            admission = classifier.admit()  # 503 here costs no read and no decode
            try:
                request = await read(classifier.meta)
                windows, counts = await _windows(classifier, request.input, deadline)
                trace = tracing.job_trace(classifier.backend.name)
                job = classifier.batcher.submit(windows, deadline, admission, trace)
                logits = await wait_for_logits(job, deadline, receive)  # (W, C)
            finally:
                admission.release()
            values = _outputs(classifier, logits, counts)
            return Answer(mv.name, mv.version, request, values, classifier.meta.labels)


async def _windows(
    classifier: Classifier, tensor: Tensor, deadline: float
) -> tuple[np.ndarray, list[int]]:
    """The request's windows (W, clip) float32 and how many belong to each element."""
    if tensor.datatype == "FP32":
        waveforms = np.ascontiguousarray(tensor.value, dtype=np.float32)  # (n, clip)
        return waveforms, [1] * len(waveforms)
    loop = asyncio.get_running_loop()
    with tracing.span("decode"):
        prepared = await asyncio.gather(
            *(
                loop.run_in_executor(classifier.decode_pool, _prepare, classifier, i, data)
                for i, data in enumerate(tensor.value)
            )
        )
    if time.monotonic() >= deadline:
        raise DeadlineExceeded("the request ran past its deadline while decoding")
    windows = np.concatenate([p.windows for p in prepared])  # (W, clip)
    return windows, [len(p.starts) for p in prepared]


def _prepare(classifier: Classifier, index: int, data: bytes) -> Prepared:
    """Decode one BYTES element (decode pool). The reader's 413/415/422 are the protocol's
    invalid argument (400), with the reader's words and the element's index."""
    try:
        return classifier.prepare(data)
    except ServiceError as e:
        if e.status in (413, 415, 422):
            raise BadTensor(f"input 'audio' element {index}: {e.message}") from None
        raise


def _outputs(classifier: Classifier, logits: np.ndarray, counts: list[int]) -> dict[str, Any]:
    """Per element: the calibrated probabilities averaged over its windows (as /v1/classify
    averages them) and the mean of its windows' logits; (n, classes) float32 each."""
    bounds = np.cumsum([0, *counts])
    temperature = classifier.meta.temperature
    probs, means = [], []
    for a, b in zip(bounds[:-1], bounds[1:], strict=True):
        probs.append(softmax(logits[a:b], temperature).mean(axis=0))  # (C,)
        means.append(logits[a:b].mean(axis=0))
    return {
        PROBABILITIES: np.asarray(probs, dtype=np.float32),
        LOGITS: np.asarray(means, dtype=np.float32),
    }


async def never_gone() -> dict[str, Any]:
    """A `receive` for callers whose cancellation says the client left (gRPC cancels the
    handler's task, and the job is abandoned then): it never reports a disconnect itself."""
    await asyncio.Event().wait()
    return {"type": "http.disconnect"}
