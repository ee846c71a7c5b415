"""The OpenAPI document says what the running configuration enforces: bearer auth on the
inference routes exactly when ESC50_API_TOKEN is set, and nowhere otherwise."""

from __future__ import annotations

import io
from pathlib import Path

import httpx
import numpy as np
import soundfile as sf
from pydantic import SecretStr
from servers import serve

from service.app import create_app
from service.settings import Settings

INFERENCE = {
    (path, "post")
    for path in (
        "/v1/classify",
        "/classify",
        "/v1/explain",
        "/v1/models/{name}/classify",
        "/v1/models/{name}/versions/{version}/classify",
        "/v1/models/{name}/explain",
        "/v1/models/{name}/versions/{version}/explain",
    )
}
TOKEN = "openapi-test-token"


def settings(model: Path, token: str | None) -> Settings:
    return Settings(
        model_path=model,
        api_token=SecretStr(token) if token else None,
        intra_op_threads=1,
        max_batch_size=2,
    )


def wav() -> bytes:
    noise = np.random.default_rng(0).uniform(-0.5, 0.5, 44100).astype(np.float32)
    buf = io.BytesIO()
    sf.write(buf, noise, 44100, format="WAV", subtype="PCM_16")
    return buf.getvalue()


def secured(schema: dict) -> set[tuple[str, str]]:
    """The operations that declare a security requirement."""
    return {
        (path, method)
        for path, ops in schema["paths"].items()
        for method, op in ops.items()
        if op.get("security")
    }


def classify(base: str, headers: dict[str, str] | None = None) -> httpx.Response:
    headers = {"content-type": "audio/wav", **(headers or {})}
    return httpx.post(f"{base}/v1/classify", content=wav(), headers=headers, timeout=30)


def test_no_token_declares_no_security_and_enforces_none(tiny_onnx: Path) -> None:
    with serve(settings(tiny_onnx, None)) as base:
        schema = httpx.get(f"{base}/openapi.json").json()
        answer = classify(base)
    assert secured(schema) == set()
    assert "securitySchemes" not in schema.get("components", {})
    for path, method in INFERENCE:
        assert "401" not in schema["paths"][path][method]["responses"], path
    assert answer.status_code == 200, answer.text  # and indeed no token is asked for


def test_token_declares_bearer_on_inference_routes_and_enforces_it(tiny_onnx: Path) -> None:
    with serve(settings(tiny_onnx, TOKEN)) as base:
        schema = httpx.get(f"{base}/openapi.json").json()
        without = classify(base)
        wrong = classify(base, {"authorization": "Bearer not-it"})
        right = classify(base, {"authorization": f"Bearer {TOKEN}"})
    ((name, scheme),) = schema["components"]["securitySchemes"].items()
    assert scheme["type"] == "http" and scheme["scheme"] == "bearer"
    assert secured(schema) == INFERENCE  # probes, /v1/models and the page stay open
    for path, method in INFERENCE:
        op = schema["paths"][path][method]
        assert op["security"] == [{name: []}] and "401" in op["responses"], path
    assert without.status_code == 401 and wrong.status_code == 401
    assert right.status_code == 200, right.text


def test_schema_follows_settings_without_a_model_loaded(tiny_onnx: Path) -> None:
    """app.openapi() alone, before any lifespan, tells the two configurations apart."""
    assert secured(create_app(settings(tiny_onnx, None)).openapi()) == set()
    assert secured(create_app(settings(tiny_onnx, TOKEN)).openapi()) == INFERENCE
