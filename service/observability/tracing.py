"""OpenTelemetry traces of every stage of a request, the batch it shared included.

On when the standard variables name a destination: OTEL_EXPORTER_OTLP_TRACES_ENDPOINT or
OTEL_EXPORTER_OTLP_ENDPOINT (OTLP over HTTP/protobuf, or gRPC with
OTEL_EXPORTER_OTLP_[TRACES_]PROTOCOL=grpc), or OTEL_TRACES_EXPORTER=console. Every other
OTEL_* variable applies as the SDK reads it (OTEL_SERVICE_NAME, OTEL_RESOURCE_ATTRIBUTES,
OTEL_TRACES_SAMPLER[_ARG], OTEL_BSP_*, OTEL_EXPORTER_OTLP_HEADERS, ...). OTEL_SDK_DISABLED=true or
OTEL_TRACES_EXPORTER=none keep it off.

Off, nothing of OpenTelemetry is imported and every hook returns at its first line (`_active`
is None), so the hot path pays one global read per hook.

A request's trace (parent: the caller's W3C `traceparent`, if any):
  request (SERVER)            method + route, status, request ID, model, audio, windows
    read body                 first receive to the last body chunk
    decode                    decode + downmix + resample + windowing
    queue wait                submitted to its first window's batch
    inference                 per batch its windows ran in: size, its windows, backend;
                              linked to that batch's span
    respond                   probabilities, top-k, the answer
One inference serves many requests, so the batch has its own span, `batch` (size, requests,
backend, inference time), child of the first sampled request in it and linked to every
request's span: from any request one follows the link to the batch, and from the batch to
every request that shared it.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import Iterable, Mapping
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any

log = logging.getLogger(__name__)

SERVICE_NAME = "esc50-serve"  # when neither OTEL_SERVICE_NAME nor OTEL_RESOURCE_ATTRIBUTES say
_PROPAGATION_HEADERS = (b"traceparent", b"tracestate", b"baggage")
_NOOP: AbstractContextManager[Any] = contextlib.nullcontext()


class _Tracing:
    """The tracer and the few API functions the hooks use, imported once, when turned on."""

    def __init__(self, provider: Any) -> None:
        from opentelemetry import context, propagate, trace

        self.provider = provider
        self.tracer = provider.get_tracer("service")
        self.trace, self.context, self.propagate = trace, context, propagate


_active: _Tracing | None = None


def enabled() -> bool:
    return _active is not None


# --- setup -----------------------------------------------------------------------------------


def setup_from_env(environ: Mapping[str, str] = os.environ) -> bool:
    """Turn tracing on if the OTEL_* variables ask for it (`python -m service` calls this)."""
    exporter = exporter_from_env(environ)
    if exporter is None:
        return False
    enable(exporter)
    log.info("tracing on: %s", type(exporter).__module__)
    return True


def exporter_from_env(environ: Mapping[str, str]) -> Any | None:
    """The span exporter the variables name, or None (tracing off)."""
    if environ.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return None
    kind = environ.get("OTEL_TRACES_EXPORTER", "otlp").strip().lower() or "otlp"
    if kind == "none":
        return None
    if kind == "console":
        from opentelemetry.sdk.trace.export import ConsoleSpanExporter

        return ConsoleSpanExporter()
    if kind != "otlp":
        raise ValueError(f"OTEL_TRACES_EXPORTER={kind!r}: this service exports otlp or console")
    endpoint = environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") or environ.get(
        "OTEL_EXPORTER_OTLP_ENDPOINT", ""
    )
    if not endpoint.strip():
        return None
    protocol = environ.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL") or environ.get(
        "OTEL_EXPORTER_OTLP_PROTOCOL", "http/protobuf"
    )
    return _otlp_exporter(protocol.strip().lower())


def _otlp_exporter(protocol: str) -> Any:
    """The OTLP exporter, configured from the OTEL_EXPORTER_OTLP_* variables by itself."""
    try:
        if protocol == "grpc":
            from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
        elif protocol == "http/protobuf":
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import (  # type: ignore[assignment]
                OTLPSpanExporter,
            )
        else:
            raise ValueError(f"OTLP protocol {protocol!r}: use grpc or http/protobuf")
    except ImportError as e:
        raise RuntimeError(
            f"tracing is configured (OTEL_EXPORTER_OTLP_*) but {e.name} is missing: "
            "pip install 'esc50-serve[serve]' (opentelemetry-sdk and the OTLP exporters)"
        ) from None
    return OTLPSpanExporter()


def enable(exporter: Any, *, batch: bool = True) -> None:
    """Trace to `exporter`: through a BatchSpanProcessor (a background thread sends; OTEL_BSP_*
    apply), or exported as each span ends (`batch=False`, tests)."""
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor

    global _active
    resource = Resource.create()  # OTEL_SERVICE_NAME, OTEL_RESOURCE_ATTRIBUTES
    if str(resource.attributes.get("service.name", "")).startswith("unknown_service"):
        resource = resource.merge(Resource({"service.name": SERVICE_NAME}))
    provider = TracerProvider(resource=resource)  # its sampler: OTEL_TRACES_SAMPLER
    processor = BatchSpanProcessor(exporter) if batch else SimpleSpanProcessor(exporter)
    provider.add_span_processor(processor)
    shutdown()
    _active = _Tracing(provider)


def shutdown() -> None:
    """Flush and stop (spans still queued are sent); tracing is off afterwards."""
    global _active
    active, _active = _active, None
    if active is not None:
        active.provider.shutdown()


# --- the request span (middleware) -----------------------------------------------------------


class RequestTrace:
    """The request's span, current in its task while the request runs; `read body` measured
    from the receive calls."""

    __slots__ = ("t", "span", "token", "body")

    def __init__(self, t: _Tracing, scope: Mapping[str, Any], request_id: str) -> None:
        carrier = {
            k.decode("latin-1"): v.decode("latin-1")
            for k, v in scope["headers"]
            if k in _PROPAGATION_HEADERS
        }
        parent = t.propagate.extract(carrier) if carrier else None
        method = scope.get("method", "")
        self.t = t
        self.span = t.tracer.start_span(
            method,
            context=parent,
            kind=t.trace.SpanKind.SERVER,
            attributes={
                "http.request.method": method,
                "url.path": scope.get("path", ""),
                "esc50.request_id": request_id,
            },
        )
        self.token = t.context.attach(t.trace.set_span_in_context(self.span, parent))
        self.body: Any = None  # the `read body` span while it is open; False once ended

    def body_receive(self) -> None:
        """Called before each receive of the body: the first one opens `read body`."""
        if self.body is None:
            self.body = self.t.tracer.start_span("read body")

    def body_received(self, total: int, last: bool) -> None:
        if last and self.body:
            self.body.set_attribute("esc50.bytes", total)
            self.body.end()
            self.body = False

    def trace_id(self) -> str | None:
        sc = self.span.get_span_context()
        return format(sc.trace_id, "032x") if sc.trace_flags.sampled else None

    def finish(self, attributes: Mapping[str, Any], route: str | None, status: int) -> None:
        if self.body:  # a body never read to its end (refused, or the client left)
            self.body.end()
        span = self.span
        if route:
            span.update_name(f"{span.name} {route}")
        span.set_attributes({k: v for k, v in attributes.items() if v is not None})
        span.set_attribute("http.response.status_code", status)
        if status >= 500:
            span.set_status(self.t.trace.Status(self.t.trace.StatusCode.ERROR))
        span.end()
        self.t.context.detach(self.token)


def start_request(scope: Mapping[str, Any], request_id: str) -> RequestTrace | None:
    t = _active
    return None if t is None else RequestTrace(t, scope, request_id)


# --- stages inside the request (classifier) --------------------------------------------------


def span(name: str) -> AbstractContextManager[Any]:
    """A child span of the current one around a `with` block (a shared no-op when off)."""
    t = _active
    return _NOOP if t is None else t.tracer.start_as_current_span(name)


def current_trace_id() -> str | None:
    """The current sampled trace's ID (32 hex digits), for log lines; None when off or none."""
    t = _active
    if t is None:
        return None
    sc = t.trace.get_current_span().get_span_context()
    return format(sc.trace_id, "032x") if sc.is_valid and sc.trace_flags.sampled else None


def exemplar() -> dict[str, str] | None:
    """`{"trace_id": ...}` of the current sampled trace for a histogram's `observe(v,
    exemplar)` (Prometheus shows it only in the OpenMetrics format), None when off or none."""
    tid = current_trace_id()
    return None if tid is None else {"trace_id": tid}


# --- the batch (batcher) ---------------------------------------------------------------------


@dataclass(slots=True)
class JobTrace:
    """What the batcher's worker thread needs to record a job's spans after the fact."""

    t: _Tracing
    context: Any  # the request's OpenTelemetry context (its span is the parent)
    span_context: Any  # the request span's SpanContext, for links
    enqueued_ns: int  # time.time_ns() at submit
    backend: str


def job_trace(backend: str) -> JobTrace | None:
    """For the job about to be submitted (classifier): None when off or outside a request."""
    t = _active
    if t is None:
        return None
    ctx = t.context.get_current()
    sc = t.trace.get_current_span(ctx).get_span_context()
    if not sc.is_valid:
        return None
    return JobTrace(t, ctx, sc, time.time_ns(), backend)


def record_batch(slices: Iterable[tuple[Any, int, int]], windows: int, seconds: float) -> None:
    """Record a batch that just ran (`seconds` of inference ending now) on the traces of the
    jobs in it: `slices` holds (job, first window, end window) with `job.trace` a JobTrace or
    None. Runs in the worker thread, after the inference (never delays it)."""
    if _active is None:
        return
    traced = [(job.trace, a, b) for job, a, b in slices if job.trace is not None]
    if not traced:
        return
    end = time.time_ns()
    start = end - int(seconds * 1e9)
    first = next((tr for tr, _, _ in traced if tr.span_context.trace_flags.sampled), traced[0][0])
    t, api = first.t, first.t.trace
    batch = t.tracer.start_span(
        "batch",
        context=first.context,
        start_time=start,
        links=[api.Link(tr.span_context, {"esc50.windows": b - a}) for tr, a, b in traced],
        attributes={
            "esc50.batch.size": windows,
            "esc50.batch.requests": len(traced),
            "esc50.backend": first.backend,
            "esc50.inference_ms": round(seconds * 1000, 3),
        },
    )
    batch.end(end_time=end)
    to_batch = [api.Link(batch.get_span_context())]
    for tr, a, b in traced:
        if a == 0:  # the job's first windows: its wait in the queue ends here
            t.tracer.start_span("queue wait", context=tr.context, start_time=tr.enqueued_ns).end(
                end_time=start
            )
        t.tracer.start_span(
            "inference",
            context=tr.context,
            start_time=start,
            links=to_batch,
            attributes={
                "esc50.batch.size": windows,
                "esc50.windows": b - a,
                "esc50.backend": tr.backend,
            },
        ).end(end_time=end)
