"""`python -m service` (= `make serve`): uvicorn on ESC50_HOST:ESC50_PORT with ESC50_* settings.

Logging goes through one handler (ESC50_LOG_FORMAT: json or text) for the service and uvicorn
alike; the service writes its own access line per request (service/observability), so uvicorn's
is off. Tracing turns on when the OTEL_* variables name an exporter."""

from __future__ import annotations

import ctypes
import os

import uvicorn

from service.app import create_app
from service.artifacts import ModelNotFound
from service.observability import tracing
from service.observability.logs import configure_logging
from service.repository import open_source
from service.settings import Settings
from service.streams import DrainingServer

# glibc's malloc, tuned for a long-running server with many threads (decode pool, batchers,
# gRPC, Starlette's thread pool): at most 2 arenas, instead of up to 8 per core created as
# threads first allocate (each a heap that keeps its pages); and a fixed mmap threshold of
# 4 MiB: windows and decode blocks (about 1 MiB) reuse heap memory, batches and long audio are
# mapped and go back to the OS when freed (by default the threshold rises to the largest buffer
# freed, and such buffers then stay in the heap). Without this the resident size stepped up by
# 72 MiB once in a 2-minute soak (make soak-ci), at a moment that depends on the traffic, which a
# soak cannot tell from a leak. The MALLOC_* variables, when set, win.
M_MMAP_THRESHOLD, M_ARENA_MAX = -3, -8
MALLOC_TUNING = {
    "MALLOC_ARENA_MAX": (M_ARENA_MAX, 2),
    "MALLOC_MMAP_THRESHOLD_": (M_MMAP_THRESHOLD, 4 * 1024 * 1024),
}


def tune_malloc() -> None:
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:  # not glibc (musl, macOS): nothing to tune
        return
    for variable, (param, value) in MALLOC_TUNING.items():
        if variable not in os.environ:
            libc.mallopt(param, value)


def main() -> None:
    tune_malloc()
    settings = Settings()
    configure_logging(settings.log_format, settings.log_level)
    try:  # the one failure worth a one-line message instead of uvicorn's traceback
        open_source(settings).check()
    except ModelNotFound as e:
        raise SystemExit(f"esc50 service: {e}") from None
    tracing.setup_from_env()
    try:
        # DrainingServer: open streams get their final events and a 1012 before uvicorn's
        # own shutdown closes every WebSocket (service/streams.py)
        config = uvicorn.Config(
            create_app(settings),
            host=settings.host,
            port=settings.port,
            log_level=settings.log_level,
            log_config=None,  # keep the handler above: uvicorn's lines in the same format
            access_log=False,
            timeout_graceful_shutdown=int(settings.drain_timeout_s) or None,
        )
        DrainingServer(config).run()
    finally:
        tracing.shutdown()  # send the spans still queued


if __name__ == "__main__":
    main()
