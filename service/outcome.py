"""Per model version request accounting, shared by every protocol (/v1, v2 REST, v2 gRPC)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from contextlib import contextmanager

from service.classifier import Classifier
from service.errors import ClientGone, ServiceError
from service.observability import tracing


@contextmanager
def version_outcome(classifier: Classifier) -> Iterator[None]:
    """Count the request on its model version by outcome status, and time it."""
    t0, status = time.perf_counter(), "200"
    try:
        yield
    except ServiceError as e:
        status = str(e.status)
        raise
    except (ClientGone, asyncio.CancelledError):  # the client went away (a gRPC cancel)
        status = "499"
        raise
    except BaseException:
        status = "500"
        raise
    finally:
        classifier.metrics.requests.labels(status).inc()
        classifier.metrics.latency.observe(time.perf_counter() - t0, tracing.exemplar())
