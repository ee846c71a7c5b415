"""Backends and artifacts: the ORT backend on the tiny model, refusals with clear messages,
default-model resolution, the TensorRT sidecar check (without a GPU) and lazy imports."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest

from contract.metadata import MetadataError
from service.artifacts import ModelNotFound, resolve_model_path
from service.backends import BackendUnavailable, load_backend, warmup
from service.batcher import Batcher
from service.metrics import Metrics
from service.settings import Settings

HAS_TRT = importlib.util.find_spec("tensorrt") is not None


@pytest.fixture(scope="module")
def ort_backend(tiny_onnx: Path):
    backend = load_backend(Settings(intra_op_threads=1), tiny_onnx)
    yield backend
    backend.close()


def test_ort_backend_reads_metadata_and_predicts(ort_backend) -> None:
    meta = ort_backend.metadata
    assert meta.labels == ["dog", "rain", "crying_baby", "door_wood_knock", "helicopter"]
    assert (meta.sample_rate, meta.clip_samples) == (44100, 220500)
    assert (ort_backend.name, ort_backend.provider) == ("onnxruntime", "CPUExecutionProvider")
    warmup(ort_backend, [1, 3])
    x = np.random.default_rng(0).standard_normal((3, meta.clip_samples)).astype(np.float32) * 0.1
    assert ort_backend.predict(x).shape == (3, 5)


def test_batching_does_not_change_logits(ort_backend) -> None:
    """The same window alone and inside a full batch (through the batcher) gives identical
    logits: the front-end's normalisation is per example and nothing else mixes rows."""
    rng = np.random.default_rng(1)
    clips = (0.1 * rng.standard_normal((8, 220500))).astype(np.float32)  # (8, clip)
    alone = np.concatenate([ort_backend.predict(clips[i : i + 1]) for i in range(8)])
    metrics = Metrics()
    batcher = Batcher(
        ort_backend.predict,
        max_batch_size=8,
        max_wait_s=0.5,
        max_queue_size=8,
        metrics=metrics.for_version("m", "1"),
    )
    batcher.start()
    jobs = [batcher.submit(clips[i : i + 1], deadline=1e12) for i in range(8)]
    batched = np.concatenate([j.future.result(30) for j in jobs])
    batcher.stop(5)

    def sample(name: str) -> float | None:
        return metrics.registry.get_sample_value(name, {"model": "m", "version": "1"})

    assert sample("esc50_batch_size_sum") == 8 and sample("esc50_batch_size_count") < 8
    np.testing.assert_array_equal(batched, alone)


def _with_props(src: Path, dst: Path, **props: str) -> Path:
    import onnx

    model = onnx.load(str(src))
    for p in model.metadata_props:
        if p.key in props:
            p.value = props[p.key]
    onnx.save(model, str(dst))
    return dst


def test_unsupported_frontend_is_refused(tiny_onnx: Path, tmp_path: Path) -> None:
    fe = json.loads(_props(tiny_onnx)["frontend"])
    bad = _with_props(
        tiny_onnx, tmp_path / "slaney.onnx", frontend=json.dumps({**fe, "mel_scale": "slaney"})
    )
    with pytest.raises(MetadataError, match="mel_scale='slaney' is not supported"):
        load_backend(Settings(), bad)


def test_labels_disagreeing_with_the_graph_are_refused(tiny_onnx: Path, tmp_path: Path) -> None:
    bad = _with_props(tiny_onnx, tmp_path / "labels.onnx", labels=json.dumps(["a", "b"]))
    with pytest.raises(MetadataError, match="graph outputs 5 classes, metadata has 2 labels"):
        load_backend(Settings(), bad)


def _props(path: Path) -> dict[str, str]:
    import onnxruntime as ort

    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return dict(sess.get_modelmeta().custom_metadata_map)


def test_missing_provider_gives_install_hint(tiny_onnx: Path) -> None:
    import onnxruntime as ort

    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("onnxruntime-gpu is installed here")
    with pytest.raises(BackendUnavailable, match=r"lacks CUDAExecutionProvider.*onnxruntime-gpu"):
        load_backend(Settings(providers="CUDAExecutionProvider,CPUExecutionProvider"), tiny_onnx)


@pytest.mark.skipif(HAS_TRT, reason="tensorrt is installed: no install hint to check")
def test_tensorrt_backend_without_tensorrt_gives_install_hint(
    tiny_onnx: Path, tmp_path: Path
) -> None:
    from contract.metadata import read_onnx_metadata, write_sidecar

    plan = tmp_path / "x.plan"
    plan.write_bytes(b"not an engine")
    write_sidecar(plan, read_onnx_metadata(tiny_onnx), {"tensorrt_version": "10.13.0"})
    with pytest.raises(BackendUnavailable, match=r"TensorRT is not installed.*\[gpu\]"):
        load_backend(Settings(backend="tensorrt"), plan)


def test_tensorrt_engine_without_sidecar_is_refused(tmp_path: Path) -> None:
    with pytest.raises(MetadataError, match="has no sidecar x.plan.json"):
        load_backend(Settings(backend="tensorrt"), tmp_path / "x.plan")


def test_settings_from_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ESC50_PROVIDERS", "CUDAExecutionProvider, CPUExecutionProvider")
    monkeypatch.setenv("ESC50_MAX_BATCH_SIZE", "32")
    monkeypatch.setenv("ESC50_API_TOKEN", "tok-9f3e")
    s = Settings()
    assert s.providers == ["CUDAExecutionProvider", "CPUExecutionProvider"]
    assert s.max_batch_size == 32 and s.api_token is not None and "tok-9f3e" not in repr(s)


# --- default model resolution ------------------------------------------------------------------


def _touch(d: Path, *names: str) -> None:
    for n in names:
        (d / n).write_bytes(b"")


def test_default_model_prefers_verified_int8(tmp_path: Path) -> None:
    s = Settings(model_dir=tmp_path)
    _touch(tmp_path, "esc50-resnet34.int8.onnx", "esc50-resnet34.fp32.onnx")
    assert resolve_model_path(s).name == "esc50-resnet34.fp32.onnx"  # int8 not verified
    verify = tmp_path / "esc50-resnet34.verify.json"
    verify.write_text(json.dumps({"variants": {"int8": {"passed": False}}}))
    assert resolve_model_path(s).name == "esc50-resnet34.fp32.onnx"
    verify.write_text(json.dumps({"variants": {"int8": {"passed": True, "top1_agree": 0.99}}}))
    assert resolve_model_path(s).name == "esc50-resnet34.int8.onnx"


def test_no_model_says_run_make_export(tmp_path: Path) -> None:
    with pytest.raises(ModelNotFound, match="Run `make export`"):
        resolve_model_path(Settings(model_dir=tmp_path))
    _touch(tmp_path, "esc50-resnet34.int8.onnx")  # present but never verified
    with pytest.raises(ModelNotFound, match="verify.json saying it passed"):
        resolve_model_path(Settings(model_dir=tmp_path))
    with pytest.raises(ModelNotFound, match="make export-trt"):
        resolve_model_path(Settings(model_dir=tmp_path, backend="tensorrt"))
    with pytest.raises(ModelNotFound, match="is not a file"):
        resolve_model_path(Settings(model_path=tmp_path / "nope.onnx"))


# --- TensorRT (the engine itself needs a GPU) -----------------------------------------------


@pytest.mark.tensorrt
@pytest.mark.skipif(not HAS_TRT, reason="needs TensorRT and a CUDA GPU (make export-trt)")
def test_tensorrt_engine_matches_onnx(repo_root: Path) -> None:
    """The engine's logits equal those of an onnxruntime session of the ONNX it was built from
    (named and hashed in its sidecar) on the same inputs, within FP16 tolerance."""
    import onnxruntime as ort

    from contract.files import sha256_file
    from contract.metadata import INPUT_NAME, OUTPUT_NAME, read_sidecar

    plan = repo_root / "models" / "esc50-resnet34.fp16.plan"
    if not plan.is_file():
        pytest.skip(f"no engine at {plan}: run make export-trt")
    _, engine = read_sidecar(plan)
    onnx_path = plan.parent / engine["onnx_file"]
    if not onnx_path.is_file() or sha256_file(onnx_path) != engine["onnx_sha256"]:
        pytest.skip(f"{onnx_path.name} is not here as the engine was built from it: make export")
    backend = load_backend(Settings(backend="tensorrt"), plan)
    try:
        n = min(8, backend.max_batch_size or 8)
        warmup(backend, [1, n])
        x = _distinct_clips(n, backend.metadata.clip_samples, backend.metadata.sample_rate)
        got = backend.predict(x)
    finally:
        backend.close()
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    (want,) = session.run([OUTPUT_NAME], {INPUT_NAME: x})
    tol = 0.05 * float(np.abs(want).max())  # FP16 kernels differ; 5% of the logit range
    assert np.abs(got - want).max() <= tol, f"max |diff| {np.abs(got - want).max():.3g} > {tol:.3g}"
    ranked = np.sort(want, axis=1)
    clear = ranked[:, -1] - ranked[:, -2] > 2 * tol  # top-1 must agree where it is not a tie
    assert (got.argmax(1) == want.argmax(1))[clear].all()


def _distinct_clips(n: int, clip_samples: int, sample_rate: int) -> np.ndarray:
    """(n, clip_samples) float32: tones at different pitches and levels over a little noise."""
    rng = np.random.default_rng(3)
    t = np.arange(clip_samples) / sample_rate
    freqs = np.geomspace(80, 8000, n)[:, None]
    x = 0.3 * np.sin(2 * np.pi * freqs * t) + 0.02 * rng.standard_normal((n, clip_samples))
    return (x * np.linspace(0.2, 1.0, n)[:, None]).astype(np.float32)


@pytest.mark.slow
def test_shipped_int8_model_is_batch_invariant(repo_root: Path) -> None:
    """Static QDQ int8 has fixed scales, so a clip's logits must not depend on its batch mates
    (dynamic quantization would break this: its scales are computed over the whole batch)."""
    model = repo_root / "models" / "esc50-resnet34.int8.onnx"
    if not model.is_file():
        pytest.skip(f"{model} not present (make export; it is committed with the shipped model)")
    backend = load_backend(Settings(), model)
    rng = np.random.default_rng(2)
    clips = (0.1 * rng.standard_normal((4, backend.metadata.clip_samples))).astype(np.float32)
    clips[1] *= 10  # a loud clip in the batch must not change the quiet ones
    batched = backend.predict(clips)
    alone = np.concatenate([backend.predict(clips[i : i + 1]) for i in range(4)])
    backend.close()
    assert np.array_equal(batched, alone), f"max |diff| {np.abs(batched - alone).max():.3g}"
