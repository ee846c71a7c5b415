"""Observability beyond metrics (docs/observability.md): request IDs end to end, structured
logs with an access line per request, and OpenTelemetry traces of every stage of a request,
the batch it shared included.

  - `request_ids`: the request's ID and what its access line reports, in a contextvar;
  - `logs`: the JSON (one object per line) and text formatters, and `configure_logging`;
  - `tracing`: OTLP export from the standard OTEL_* variables, off (and free) when unset;
  - `middleware`: the pure ASGI middleware that ties them to every HTTP request.
"""
