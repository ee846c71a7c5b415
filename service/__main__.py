"""`python -m service` (= `make serve`): uvicorn on ESC50_HOST:ESC50_PORT with ESC50_* settings.

Logging goes through one handler (ESC50_LOG_FORMAT: json or text) for the service and uvicorn
alike; the service writes its own access line per request (service/observability), so uvicorn's
is off. Tracing turns on when the OTEL_* variables name an exporter."""

from __future__ import annotations

import uvicorn

from service.app import create_app
from service.artifacts import ModelNotFound
from service.observability import tracing
from service.observability.logs import configure_logging
from service.repository import open_source
from service.settings import Settings
from service.streams import DrainingServer


def main() -> None:
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
