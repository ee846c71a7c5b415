"""`python -m service` (= `make serve`): uvicorn on ESC50_HOST:ESC50_PORT with ESC50_* settings."""

from __future__ import annotations

import logging

import uvicorn

from service.app import create_app
from service.artifacts import ModelNotFound, resolve_model_path
from service.settings import Settings


def main() -> None:
    settings = Settings()
    logging.basicConfig(
        level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    try:  # the one failure worth a one-line message instead of uvicorn's traceback
        resolve_model_path(settings)
    except ModelNotFound as e:
        raise SystemExit(f"esc50 service: {e}") from None
    uvicorn.run(
        create_app(settings),
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level,
        timeout_graceful_shutdown=int(settings.drain_timeout_s) or None,
    )


if __name__ == "__main__":
    main()
