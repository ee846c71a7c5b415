"""Prometheus metrics, one registry per app (tests build several apps in one process).

Names follow Triton (`nv_inference_queue_duration_us`, `..._compute_infer_...`) and Ray Serve
(`serve_num_http_requests{route,status}`, `serve_deployment_queued_queries`) in spirit.
"""

from __future__ import annotations

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
        self.decode_latency = Histogram(
            "decode_duration_seconds",
            "Decode + downmix + resample + windowing per request",
            namespace=ns,
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.queue_latency = Histogram(
            "queue_duration_seconds",
            "Wait from enqueue until a request's first window runs",
            namespace=ns,
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.inference_latency = Histogram(
            "inference_duration_seconds",
            "Backend compute time per batch",
            namespace=ns,
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.batch_size = Histogram(
            "batch_size",
            "Windows per inference batch",
            namespace=ns,
            buckets=BATCH_BUCKETS,
            registry=r,
        )
        self.queue_depth = Gauge(
            "queue_depth", "Requests waiting for inference", namespace=ns, registry=r
        )
        self.in_flight = Gauge(
            "requests_in_flight", "Classify requests being handled", namespace=ns, registry=r
        )
        self.rejected = Counter(
            "requests_rejected",
            "Requests refused for overload (queue full, shutting down)",
            ["reason"],
            namespace=ns,
            registry=r,
        )
        self.dropped = Counter(
            "requests_dropped",
            "Queued requests dropped before inference (client gone, deadline)",
            ["reason"],
            namespace=ns,
            registry=r,
        )
        self.batch_failures = Counter(
            "batch_failures", "Batches whose backend call raised", namespace=ns, registry=r
        )
        self.model_info = Info("model", "The served model", namespace=ns, registry=r)
        self.ready = Gauge(
            "ready", "1 once the model is loaded and warmed", namespace=ns, registry=r
        )
