"""Log lines: one JSON object per line (`ESC50_LOG_FORMAT=json`, the images' default) or
readable text (`make serve`), both carrying the current request's ID; and the access line.

Fields (docs/observability.md lists them with their meaning): time, level, logger, message,
and when present request_id, trace_id, method, path, route, status, duration_ms, model,
model_version, bytes_in, audio_s, windows, error_code, exception. Nothing else about a request
is logged: never the audio, never a header's value other than the request ID (so never a token).
"""

from __future__ import annotations

import json
import logging
import random
import sys
from datetime import datetime, timezone

from service.observability import tracing
from service.observability.request_ids import RequestInfo, current_request_id

ACCESS_LOGGER = "service.access"
# the fields a record may carry (`extra=`) beyond time/level/logger/message, in output order
FIELDS = (
    "request_id",
    "trace_id",
    "method",
    "path",
    "route",
    "status",
    "duration_ms",
    "model",
    "model_version",
    "bytes_in",
    "audio_s",
    "windows",
    "error_code",
)
access_log = logging.getLogger(ACCESS_LOGGER)


def _fields(record: logging.LogRecord) -> dict[str, object]:
    """The request fields of a record: its own (`extra=`), else the current request's ID and
    trace ID (a log line written while the request runs)."""
    out = {k: v for k in FIELDS if (v := record.__dict__.get(k)) is not None}
    if "request_id" not in out and (rid := current_request_id()) is not None:
        out["request_id"] = rid
    if "trace_id" not in out and (tid := tracing.current_trace_id()) is not None:
        out["trace_id"] = tid
    return out


class JsonFormatter(logging.Formatter):
    """One JSON object per line; a traceback is one string field (`exception`)."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, object] = {
            "time": datetime.fromtimestamp(record.created, timezone.utc).isoformat(
                timespec="milliseconds"
            ),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        out |= _fields(record)
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        if record.stack_info:
            out["stack"] = self.formatStack(record.stack_info)
        return json.dumps(out, ensure_ascii=False, default=str)


class TextFormatter(logging.Formatter):
    """`time LEVEL logger: message key=value ...` (the request fields after the message)."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")

    def formatMessage(self, record: logging.LogRecord) -> str:  # noqa: N802 (logging's name)
        line = super().formatMessage(record)
        fields = _fields(record)
        return line + "".join(f" {k}={v}" for k, v in fields.items()) if fields else line


def configure_logging(log_format: str, level: str) -> None:
    """Every logger (the service's, uvicorn's, the libraries') through one stderr handler."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if log_format == "json" else TextFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())


def log_access(info: RequestInfo, duration_s: float, sample: float, trace_id: str | None) -> None:
    """The request's access line. Failures (status >= 400) are always written; the others with
    probability `sample` (ESC50_ACCESS_LOG_SAMPLE)."""
    status = info.status or 500
    if status < 400 and sample < 1.0 and random.random() >= sample:
        return
    if not access_log.isEnabledFor(logging.INFO):
        return
    ms = round(duration_s * 1000, 2)
    extra = {
        "request_id": info.request_id,
        "trace_id": trace_id,
        "method": info.method,
        "path": info.path,
        "route": info.route,
        "status": status,
        "duration_ms": ms,
        "model": info.model,
        "model_version": info.model_version,
        "bytes_in": info.bytes_in,
        "audio_s": info.audio_s,
        "windows": info.windows,
        "error_code": info.error_code,
    }
    access_log.info("%s %s %d %.1f ms", info.method, info.path, status, ms, extra=extra)
