"""/v1/explain on the tiny model: the explain artifact's outputs, the response's shapes, the CAM
against a numpy recomputation from the artifact's own weights, the log-mel against the training
front-end, and the errors (no artifact, too long, overloaded, not audio)."""

from __future__ import annotations

import base64
import io
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import soundfile as sf
import torch
from fastapi.testclient import TestClient
from onnx import numpy_helper

from contract.metadata import (
    EXPLAIN_VARIANT,
    INPUT_NAME,
    ExplainOutputs,
    MetadataError,
    read_onnx_metadata,
)
from export.__main__ import main as export_main
from service.app import create_app
from service.explain import ExplainUnavailable, _check_same_model, cell_centres, explain_path
from service.settings import Settings
from train.frontend import FrontendConfig, LogMel

SR = 44100
CLIP = 5 * SR


def wav(seconds: float, seed: int = 0) -> tuple[bytes, np.ndarray]:
    """A float WAV (decoded bit-exactly) and its samples."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * SR)) / SR
    x = 0.3 * np.sin(2 * np.pi * (300 + 500 * seed) * t * (1 + t)) + 0.03 * rng.standard_normal(
        t.size
    )
    x = x.astype(np.float32)
    buf = io.BytesIO()
    sf.write(buf, x, SR, format="WAV", subtype="FLOAT")
    return buf.getvalue(), x


def decoded(m: dict) -> np.ndarray:
    """An EncodedMap back to floats (within half a step of 8-bit quantisation)."""
    u8 = np.frombuffer(base64.b64decode(m["data"]), np.uint8).reshape(m["shape"])
    return m["min"] + (m["max"] - m["min"]) * u8.astype(np.float64) / 255


def step(m: dict) -> float:
    return (m["max"] - m["min"]) / 255


def settings_for(model: Path, **kw) -> Settings:
    return Settings(model_path=model, intra_op_threads=1, warmup=False, **kw)


@pytest.fixture(scope="module")
def client(tiny_onnx: Path, tiny_explain_onnx: Path) -> Iterator[TestClient]:
    with TestClient(create_app(settings_for(tiny_onnx, explain_max_duration_s=20))) as c:
        yield c


def explain(client: TestClient, body: bytes, **params) -> dict:
    r = client.post(
        "/v1/explain", content=body, params=params, headers={"content-type": "audio/wav"}
    )
    assert r.status_code == 200, r.text
    return r.json()


def run_artifact(path: Path, x: np.ndarray) -> dict[str, np.ndarray]:
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = [o.name for o in sess.get_outputs()]
    return dict(zip(names, sess.run(None, {INPUT_NAME: x}), strict=True))


# --- the artifact ----------------------------------------------------------------------------


def test_explain_artifact_names_its_outputs(tiny_explain_onnx: Path, tiny_onnx: Path) -> None:
    meta = read_onnx_metadata(tiny_explain_onnx)
    outputs = ExplainOutputs.from_metadata(meta)
    assert meta.variant == EXPLAIN_VARIANT
    assert outputs.stages == ("stem", "stage1", "stage2") and outputs.cam_maps == "stage2"
    graph = onnx.load(str(tiny_explain_onnx), load_external_data=False).graph
    assert [o.name for o in graph.output] == outputs.names()
    x = wav(5.0)[1][None, :CLIP]
    got = run_artifact(tiny_explain_onnx, x)
    served = run_artifact(tiny_onnx, x)["logits"]
    np.testing.assert_allclose(got["logits"], served, rtol=1e-5, atol=1e-5)  # same model
    assert got["logmel"].shape == (1, 1, 128, 431) and got["stage2"].shape == (1, 16, 16, 54)
    with pytest.raises(MetadataError, match="not an explain artifact"):
        ExplainOutputs.from_metadata(read_onnx_metadata(tiny_onnx))


def test_cli_writes_the_explain_variant(tiny_checkpoint: Path, tmp_path: Path) -> None:
    prefix = tmp_path / "cli"
    args = [
        "onnx",
        "--checkpoint",
        str(tiny_checkpoint),
        "--out-prefix",
        str(prefix),
        "--variants",
        "explain",
    ]
    assert export_main(args) == 0
    assert read_onnx_metadata(f"{prefix}.explain.onnx").variant == EXPLAIN_VARIANT


# --- the response ----------------------------------------------------------------------------


def test_shapes_and_classification(client: TestClient) -> None:
    body, _ = wav(5.0)
    e = explain(client, body, top_k=3)
    c = client.post(
        "/v1/classify", content=body, params={"top_k": 3}, headers={"content-type": "audio/wav"}
    ).json()
    got = e["classification"]
    assert [p["label"] for p in got["predictions"]] == [p["label"] for p in c["predictions"]]
    np.testing.assert_allclose(
        [p["probability"] for p in got["predictions"]],
        [p["probability"] for p in c["predictions"]],
        atol=1e-5,
    )
    assert got["model"]["variant"] == EXPLAIN_VARIANT
    assert e["windows"][0]["cam_label"] == got["predictions"][0]["label"]  # one window: the top
    assert e["frame_hop_s"] == pytest.approx(512 / SR)
    (w,) = e["windows"]
    assert (w["start_s"], w["end_s"]) == (0.0, 5.0)
    assert w["logmel"]["shape"] == w["cam"]["shape"] == [128, 431]  # the CAM on the log-mel's grid
    stages = {s["name"]: s for s in w["stages"]}
    assert list(stages) == ["stem", "stage1", "stage2"]
    assert [s["channels"] for s in stages.values()] == [8, 8, 16]
    for s in stages.values():
        assert len(s["top_channels"]) == len(s["maps"]) == 4
        assert all(m["shape"] == s["mean"]["shape"] for m in s["maps"])
    assert stages["stem"]["mean"]["shape"] == [32, 108]


def test_long_audio_explains_every_classify_window(client: TestClient) -> None:
    e = explain(client, wav(12.0, seed=1)[0])
    timeline = e["classification"]["timeline"]
    assert len(e["windows"]) == len(timeline) == e["classification"]["windows"] == 4
    assert [w["start_s"] for w in e["windows"]] == [t["start_s"] for t in timeline]
    assert [w["cam_label"] for w in e["windows"]] == [t["label"] for t in timeline]


def test_cam_is_the_weighted_sum_of_last_stage_maps(client, tiny_explain_onnx: Path) -> None:
    body, x = wav(5.0, seed=2)
    e = explain(client, body)
    k, cam = e["windows"][0]["cam_index"], e["windows"][0]["cam"]
    # The weights straight from the graph's initializers, not from the service's reading of them
    inits = {
        t.name: numpy_helper.to_array(t)
        for t in onnx.load(str(tiny_explain_onnx)).graph.initializer
    }
    names = ExplainOutputs.from_metadata(read_onnx_metadata(tiny_explain_onnx))
    out = run_artifact(tiny_explain_onnx, x[None, :CLIP])
    weight = next(v for v in inits.values() if v.shape == out[names.classifier_weight].shape)
    bias = next(v for v in inits.values() if v.shape == (weight.shape[0],))
    want = np.einsum("c,chw->hw", weight[k].astype(np.float64), out["stage2"][0])
    # sent on the log-mel's grid: each stage-2 cell's value at its receptive field's centre
    on_cells = decoded(cam)[np.ix_(cell_centres(128, 16), cell_centres(431, 54))]
    np.testing.assert_allclose(on_cells, want, atol=0.51 * step(cam) + 1e-5)
    # global average pooling + the linear layer: the CAM's mean plus the bias is the logit
    assert want.mean() + bias[k] == pytest.approx(float(out["logits"][0, k]), abs=1e-4)


def test_logmel_is_the_training_front_end(client: TestClient, tiny_explain_onnx: Path) -> None:
    body, x = wav(5.0, seed=3)
    logmel = explain(client, body)["windows"][0]["logmel"]
    fe = LogMel(FrontendConfig.from_dict(read_onnx_metadata(tiny_explain_onnx).frontend))
    with torch.no_grad():
        want = fe(torch.from_numpy(x[None, :CLIP]))[0, 0].numpy()  # (n_mels, frames)
    np.testing.assert_allclose(decoded(logmel), want, atol=0.51 * step(logmel) + 1e-4)


# --- errors ----------------------------------------------------------------------------------


def test_missing_artifact_is_503_with_a_hint(tiny_onnx: Path, tmp_path: Path) -> None:
    s = settings_for(tiny_onnx, explain_model_path=tmp_path / "absent.explain.onnx")
    with TestClient(create_app(s)) as c:
        body = wav(5.0)[0]
        r = c.post("/v1/explain", content=body, headers={"content-type": "audio/wav"})
        assert r.status_code == 503 and "Retry-After" in r.headers
        err = r.json()["error"]
        assert err["code"] == "explain_unavailable" and "make export" in err["message"]
        ok = c.post("/v1/classify", content=body, headers={"content-type": "audio/wav"})
        assert ok.status_code == 200


def test_explain_limits(client: TestClient) -> None:
    r = client.post("/v1/explain", content=wav(21.0)[0], headers={"content-type": "audio/wav"})
    assert r.status_code == 413 and r.json()["error"]["code"] == "audio_too_long"
    r = client.post("/v1/explain", content=b"not audio" * 50, headers={"content-type": "audio/wav"})
    assert r.status_code == 415 and set(r.json()) == {"error"}
    explainer = client.app.state.repository.get().explainer  # type: ignore[attr-defined]
    s = explainer.settings
    explainer.pending = s.explain_concurrency + s.explain_max_queue  # as if that many queued
    try:
        r = client.post("/v1/explain", content=wav(5.0)[0], headers={"content-type": "audio/wav"})
        assert r.status_code == 503 and r.json()["error"]["code"] == "overloaded"
    finally:
        explainer.pending = 0


def test_explain_path_sits_beside_the_served_artifact(tmp_path: Path) -> None:
    assert (
        explain_path(Settings(model_path=tmp_path / "m.int8.onnx")) == tmp_path / "m.explain.onnx"
    )
    assert explain_path(Settings(model_path=tmp_path / "m.onnx")) == tmp_path / "m.explain.onnx"
    assert explain_path(Settings(model_dir=tmp_path, model_stem="s")) == tmp_path / "s.explain.onnx"
    chosen = tmp_path / "x.onnx"
    assert explain_path(Settings(explain_model_path=chosen)) == chosen


def test_an_artifact_of_another_checkpoint_is_refused(tiny_explain_onnx: Path) -> None:
    meta = read_onnx_metadata(tiny_explain_onnx)
    _check_same_model(meta, meta, tiny_explain_onnx)
    with pytest.raises(ExplainUnavailable, match="another checkpoint"):
        _check_same_model(meta, replace(meta, checkpoint_sha256="0" * 64), tiny_explain_onnx)
    with pytest.raises(ExplainUnavailable):
        _check_same_model(meta, replace(meta, labels=meta.labels[::-1]), tiny_explain_onnx)


# --- the page and the docs are served locally --------------------------------------------------


def test_page_and_docs_need_no_network(client: TestClient) -> None:
    page = client.get("/")
    assert page.status_code == 200 and 'href="docs"' in page.text
    assert client.get("/static/app.js").status_code == 200
    docs = client.get("/docs")
    assert docs.status_code == 200 and "/docs-assets/swagger-ui-bundle.js" in docs.text
    assert "cdn" not in docs.text.lower() and "http" not in docs.text.split("<script>")[0]
    js = client.get("/docs-assets/swagger-ui-bundle.js")
    assert js.status_code == 200 and "SwaggerUIBundle" in js.text
    spec = client.get("/openapi.json").json()
    assert "/v1/explain" in spec["paths"] and "ExplainResponse" in spec["components"]["schemas"]
    assert "(/)" in spec["info"]["description"]  # the docs link back to the page
