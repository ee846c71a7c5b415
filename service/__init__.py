"""ESC-50 inference service (no torch).

Layers, kept apart: `app` (HTTP: routes, lifespan, middleware) -> `classifier` (decode, windows,
aggregate) -> `batcher` (dynamic batching, worker thread) -> `backends` (onnxruntime, tensorrt).
`settings` reads ESC50_* env vars; `errors` maps domain errors to one JSON shape.
"""
