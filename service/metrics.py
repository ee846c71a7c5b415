"""Prometheus metrics, one registry per app (tests build several apps in one process).

Names follow Triton (`nv_inference_queue_duration_us`, `..._compute_infer_...`) and Ray Serve
(`serve_num_http_requests{route,status}`, `serve_deployment_queued_queries`) in spirit.
"""

from __future__ import annotations

import contextlib
from typing import Any

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    Info,
    gc_collector,
    platform_collector,
    process_collector,
)

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
BATCH_BUCKETS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 128)


class Metrics:
    def __init__(self, namespace: str = "esc50") -> None:
        self.registry = r = CollectorRegistry()
        process_collector.ProcessCollector(registry=r)  # process_cpu_seconds_total, RSS, fds
        platform_collector.PlatformCollector(registry=r)
        gc_collector.GCCollector(registry=r)
        ns = namespace
        self.requests = Counter(
            "http_requests",
            "HTTP requests by route, method and status code",
            ["route", "method", "status"],
            namespace=ns,
            registry=r,
        )
        self.request_latency = Histogram(
            "request_duration_seconds",
            "End-to-end classify latency (arrival to answer)",
            ["route"],
            namespace=ns,
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        # Per loaded model version (labels `model`, `version`): each version has its own
        # batcher, so queues, batches and latencies are its own. `for_version` binds them.
        mv = ["model", "version"]
        self.version_requests = Counter(
            "inference_requests",
            "Inference requests answered by a model version, by outcome status code",
            [*mv, "status"],
            namespace=ns,
            registry=r,
        )

        def per_version(name: str, doc: str, buckets: tuple = LATENCY_BUCKETS) -> Histogram:
            return Histogram(name, doc, mv, namespace=ns, buckets=buckets, registry=r)

        self.version_latency = per_version(
            "inference_request_duration_seconds",
            "Arrival to answer of requests a model version answered",
        )
        self.decode_latency = per_version(
            "decode_duration_seconds", "Decode + downmix + resample + windowing per request"
        )
        self.queue_latency = per_version(
            "queue_duration_seconds", "Wait from enqueue until a request's first window runs"
        )
        self.inference_latency = per_version(
            "inference_duration_seconds", "Backend compute time per batch"
        )
        self.batch_size = per_version("batch_size", "Windows per inference batch", BATCH_BUCKETS)
        self.queue_depth = Gauge(
            "queue_depth", "Requests waiting for inference", mv, namespace=ns, registry=r
        )
        self.in_flight = Gauge(
            "requests_in_flight", "Classify requests being handled", namespace=ns, registry=r
        )
        self.rejected = Counter(
            "requests_rejected",
            "Requests refused for overload (queue full, shutting down)",
            [*mv, "reason"],
            namespace=ns,
            registry=r,
        )
        self.dropped = Counter(
            "requests_dropped",
            "Queued requests dropped before inference (client gone, deadline)",
            [*mv, "reason"],
            namespace=ns,
            registry=r,
        )
        self.batch_failures = Counter(
            "batch_failures", "Batches whose backend call raised", mv, namespace=ns, registry=r
        )
        self.model_info = Info(
            "model", "The default model version (answers /v1/classify)", namespace=ns, registry=r
        )
        self.version_state = Gauge(
            "model_version_loaded",
            "1 per model version in a state (loading, ready, unloading, failed)",
            [*mv, "state"],
            namespace=ns,
            registry=r,
        )
        self.version_memory = Gauge(
            "model_version_memory_bytes",
            "Resident memory a model version added when it loaded and warmed (RSS delta)",
            mv,
            namespace=ns,
            registry=r,
        )
        self.ready = Gauge(
            "ready", "1 once the model is loaded and warmed", namespace=ns, registry=r
        )

    def for_version(self, model: str, version: str) -> VersionMetrics:
        return VersionMetrics(self, model, version)

    def forget_version(self, model: str, version: str) -> None:
        """Drop an unloaded version's series, so dashboards do not show it as still there."""
        for metric in (
            self.version_latency,
            self.decode_latency,
            self.queue_latency,
            self.inference_latency,
            self.batch_size,
            self.queue_depth,
            self.batch_failures,
            self.version_memory,
        ):
            with contextlib.suppress(KeyError):
                metric.remove(model, version)


class _Reasons:
    """A counter with model/version bound, keeping the `.labels(reason)` call of the batcher."""

    def __init__(self, counter: Counter, model: str, version: str) -> None:
        self.counter, self.bound = counter, (model, version)

    def labels(self, reason: str) -> Any:
        return self.counter.labels(*self.bound, reason)


class VersionMetrics:
    """The metrics one model version's classifier and batcher record, labels bound."""

    def __init__(self, m: Metrics, model: str, version: str) -> None:
        self.model, self.version, self.registry = model, version, m.registry
        self.requests = _Reasons(m.version_requests, model, version)  # .labels(status)
        self.latency = m.version_latency.labels(model, version)
        self.decode_latency = m.decode_latency.labels(model, version)
        self.queue_latency = m.queue_latency.labels(model, version)
        self.inference_latency = m.inference_latency.labels(model, version)
        self.batch_size = m.batch_size.labels(model, version)
        self.queue_depth = m.queue_depth.labels(model, version)
        self.rejected = _Reasons(m.rejected, model, version)
        self.dropped = _Reasons(m.dropped, model, version)
        self.batch_failures = m.batch_failures.labels(model, version)
