"""Export stage on CPU: tiny models through the real exporter, quantiser, verifier and CLI."""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from conftest import waveforms
from onnx import TensorProto, helper

from contract.errors import ExportError
from contract.metadata import INPUT_NAME, OUTPUT_NAME, ArtifactMetadata, read_onnx_metadata
from contract.tensorrt_runtime import EngineMismatchError, check_engine_compat
from export.__main__ import main
from export.graph import QDQ_OPS, check_fp16_layout, check_int8_layout, frontend_nodes
from export.quantize import fp32_islands, quantize_int8, sensitive_nodes
from export.verify import Artifact, Thresholds, verify_artifacts
from export.verify_cli import torch_runner
from train.checkpoint import load_checkpoint, model_from_checkpoint, save_checkpoint

N = 220500  # clip samples of the default front-end


def run_onnx(path, x: np.ndarray) -> np.ndarray:
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return sess.run(None, {INPUT_NAME: x})[0]


@pytest.fixture(scope="session")
def tiny_model(tiny_checkpoint):
    return model_from_checkpoint(load_checkpoint(tiny_checkpoint))


# --------------------------------------------------------------------------- fp32 graph


def test_fp32_graph_matches_torch_at_any_batch(tiny_onnx, tiny_model):
    model = onnx.load(str(tiny_onnx))
    assert [i.name for i in model.graph.input] == [INPUT_NAME]
    assert [o.name for o in model.graph.output] == [OUTPUT_NAME]
    batch_dim, samples_dim = model.graph.input[0].type.tensor_type.shape.dim
    assert batch_dim.dim_param and samples_dim.dim_value == N  # dynamic batch, fixed clip
    assert max(o.version for o in model.opset_import if o.domain in ("", "ai.onnx")) >= 17
    assert not any(n.op_type == "BatchNormalization" for n in model.graph.node)  # folded
    for batch in (1, 3):
        x = waveforms(batch, seed=batch)
        got = run_onnx(tiny_onnx, x)
        want = tiny_model(torch.from_numpy(x)).detach().numpy()
        assert got.dtype == np.float32 and got.shape == (batch, 5)
        np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-4)


def test_metadata_round_trip(tiny_onnx, tiny_checkpoint, tiny_meta):
    meta = read_onnx_metadata(tiny_onnx)
    assert meta.variant == "fp32"
    assert meta.labels == load_checkpoint(tiny_checkpoint)["labels"]
    assert meta.checkpoint_sha256 == hashlib.sha256(tiny_checkpoint.read_bytes()).hexdigest()
    assert meta.sample_rate == 44100 and meta.clip_samples == N
    assert meta.frontend == tiny_meta.frontend and meta.model_config == tiny_meta.model_config
    assert ArtifactMetadata.from_props(meta.to_props()) == meta
    assert "val_stems" not in meta.data  # summaries only, no clip lists


# --------------------------------------------------------------------------- fp16 graph


def test_fp16_graph_keeps_frontend_fp32(tiny_fp16, tiny_onnx, tiny_model):
    model = onnx.load(str(tiny_fp16))
    assert check_fp16_layout(model) == []
    assert read_onnx_metadata(tiny_fp16).variant == "fp16"
    assert check_fp16_layout(onnx.load(str(tiny_onnx)))  # an all-FP32 graph is not the fp16 layout
    x = waveforms(4, seed=2)
    got = run_onnx(tiny_fp16, x)
    want = tiny_model(torch.from_numpy(x)).detach().numpy()
    assert got.dtype == np.float32
    np.testing.assert_allclose(got, want, atol=5e-2, rtol=5e-2)


def test_fp16_check_catches_fp16_inside_the_frontend(tiny_fp16):
    """Round the dB values through FP16 before normalisation: the check must see it."""
    model = onnx.load(str(tiny_fp16))
    log = next(n for n in model.graph.node if n.op_type == "Log")
    original = log.output[0]
    log.output[0] = "log_f32"
    casts = [
        helper.make_node(
            "Cast", ["log_f32"], ["log_f16"], to=TensorProto.FLOAT16, name="early_half"
        ),
        helper.make_node(
            "Cast", ["log_f16"], [original], to=TensorProto.FLOAT, name="back_to_float"
        ),
    ]
    idx = list(model.graph.node).index(log)
    for k, node in enumerate(casts):
        model.graph.node.insert(idx + 1 + k, node)
    problems = check_fp16_layout(model)
    assert any("log_f16" in p for p in problems), problems


# --------------------------------------------------------------------------- int8 graph


def test_int8_quantises_cnn_not_frontend(tiny_int8, tiny_onnx):
    model = onnx.load(str(tiny_int8))
    assert check_int8_layout(model) == []
    front = frontend_nodes(model)
    assert {"Conv", "MatMul", "Log", "Sqrt"} <= {n.op_type for n in front}
    assert not [n.name for n in front if n.op_type in QDQ_OPS]
    ops = [n.op_type for n in model.graph.node]
    assert ops.count("DequantizeLinear") >= 5  # weights and activations of the CNN
    # The classifier stays FP32 (a plain initializer); the stem conv is quantised.
    inits = {t.name for t in model.graph.initializer}
    parts = sensitive_nodes(model)
    by_name = {n.name: n for n in model.graph.node}
    assert by_name[parts["classifier"]].input[1] in inits
    assert by_name[parts["stem"]].input[1] not in inits
    assert fp32_islands(tiny_int8) == []  # int8 from the stem to the pooled features
    meta = read_onnx_metadata(tiny_int8)
    assert meta.variant == "int8" and json.loads(meta.extra["int8_calibration"])["clips"] == 8
    assert json.loads(meta.extra["int8_fp32_parts"]) == ["classifier"]
    assert meta.calibration == read_onnx_metadata(tiny_onnx).calibration  # the temperature
    x = waveforms(4, seed=3)
    q, f = run_onnx(tiny_int8, x), run_onnx(tiny_onnx, x)
    assert np.isfinite(q).all() and np.corrcoef(q.ravel(), f.ravel())[0, 1] > 0.9


def test_fp32_islands_finds_layout_changes_between_quantised_ops(tiny_onnx, tiny_meta, tmp_path):
    """With the stem conv in FP32, ORT runs the first residual Adds in NCHW between NHWC convs."""
    out = tmp_path / "stem-fp32.int8.onnx"
    quantize_int8(tiny_onnx, out, waveforms(4, seed=1), tiny_meta, keep_fp32=("stem", "classifier"))
    assert any("Transpose" in p for p in fp32_islands(out))
    with pytest.raises(ExportError, match="unknown CNN parts"):
        quantize_int8(tiny_onnx, out, waveforms(4), tiny_meta, keep_fp32=("head",))


# --------------------------------------------------------------------------- verification


def perturbed_copy(src, dst, scale: float = 1.05):
    """The same graph with the classifier's weights scaled: plausible, wrong logits."""
    model = onnx.load(str(src))
    fc = next(t for t in model.graph.initializer if t.name.endswith("fc.weight"))
    w = onnx.numpy_helper.to_array(fc) * scale
    fc.CopyFrom(onnx.numpy_helper.from_array(w.astype(np.float32), fc.name))
    onnx.save(model, str(dst))
    return dst


def test_verify_passes_faithful_and_fails_perturbed_or_corrupt(tiny_onnx, tiny_model, tmp_path):
    x = waveforms(6, seed=4)
    targets = np.array([0, 1, 2, 3, 4, -1])
    ref = torch_runner(tiny_model)
    good = verify_artifacts(ref, [Artifact("fp32", tiny_onnx)], x, targets, batch_size=4)
    assert good["passed"] and good["variants"]["fp32"]["max_abs_logit_diff"] < 1e-3

    bad = perturbed_copy(tiny_onnx, tmp_path / "bad.onnx")
    corrupt = tmp_path / "corrupt.onnx"
    corrupt.write_bytes(tiny_onnx.read_bytes()[:5000])
    report = verify_artifacts(ref, [Artifact("fp32", bad), Artifact("int8", corrupt)], x, targets)
    assert not report["passed"]
    assert any("max |Δlogit|" in w for w in report["variants"]["fp32"]["failures"])
    assert "cannot run" in report["variants"]["int8"]["failures"][0]


def test_verify_int8_accuracy_rule(tiny_onnx, tiny_int8, tiny_model, tmp_path):
    """int8 is judged on its own accuracy against fp32's: the verifier runs the int8 file (its
    reported accuracy is the one measured on that file here), a quantised graph that lost
    accuracy fails by the allowed drop and passes when that drop is allowed."""
    x = waveforms(8, seed=5)
    targets = run_onnx(tiny_onnx, x).argmax(1)  # fp32 is right on every clip: accuracy 1
    # the real int8 graph with its classifier (FP32 in it) negated: its top-1 moves off fp32's
    lossy = perturbed_copy(tiny_int8, tmp_path / "lossy.int8.onnx", scale=-1.0)
    ref = torch_runner(tiny_model)
    accuracy_rule_only = {"int8_agreement": 0.0}  # the agreement rule would fail it too
    for int8 in (tiny_int8, lossy):
        drop = 1.0 - float((run_onnx(int8, x).argmax(1) == targets).mean())
        arts = [Artifact("fp32", tiny_onnx), Artifact("int8", int8)]
        for allowed, passes in ((drop + 0.01, True), (drop - 0.01, False)):
            th = Thresholds(int8_accuracy_drop=allowed, **accuracy_rule_only)
            report = verify_artifacts(ref, arts, x, targets, th)
            fp32, got = report["variants"]["fp32"], report["variants"]["int8"]
            assert fp32["passed"] and fp32["accuracy"] == 1.0
            assert got["accuracy"] == pytest.approx(1.0 - drop), int8.name
            assert got["passed"] is passes, (int8.name, allowed, got["failures"])
            if not passes:
                assert any("below fp32" in f for f in got["failures"]), got["failures"]
    assert 1.0 - float((run_onnx(lossy, x).argmax(1) == targets).mean()) >= 0.5


def test_verify_cli_writes_report_and_fails_on_perturbed_artifact(
    tiny_checkpoint, tiny_onnx, esc50_root, tmp_path, capsys
):
    ckpt = shutil.copy(tiny_checkpoint, tmp_path / "m.pt")
    perturbed_copy(tiny_onnx, tmp_path / "m.fp32.onnx", scale=1.5)
    # the copy's metadata names tiny_checkpoint's sha256, identical bytes: accepted as its own
    rc = main(
        [
            "verify",
            "--checkpoint",
            str(ckpt),
            "--data-root",
            str(esc50_root),
            "--max-clips",
            "6",
            "--variants",
            "fp32,int8",
        ]
    )
    assert rc == 1
    report = json.loads((tmp_path / "m.verify.json").read_text())
    assert report["variants"]["fp32"]["passed"] is False
    assert report["variants"]["int8"] == {
        **report["variants"]["int8"],
        "passed": False,
        "status": "skipped",
    }
    assert (
        report["clips"]["count"] == 6 and "may be training clips" in report["clips"]["description"]
    )
    assert (tmp_path / "m.verify.md").read_text().count("| fp32 | failed") == 1
    assert capsys.readouterr().err.strip().startswith("error: verification failed for fp32")


# --------------------------------------------------------------------------- CLI errors


def _one_line_error(capsys, rc: int, *words: str) -> None:
    err = capsys.readouterr().err.strip()
    assert rc == 2 and err.count("\n") == 0 and "Traceback" not in err, err
    for w in words:
        assert w in err, err


def test_cli_missing_corrupt_and_incompatible_checkpoint(tmp_path, capsys):
    _one_line_error(
        capsys, main(["onnx", "--checkpoint", str(tmp_path / "none.pt")]), "no checkpoint"
    )
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    _one_line_error(
        capsys, main(["onnx", "--checkpoint", str(tmp_path / "junk.pt")]), "cannot read"
    )
    from train.model import AudioClassifier, ModelConfig

    model = AudioClassifier(ModelConfig(n_classes=2, widths=(4,), depths=(1,)))
    save_checkpoint(tmp_path / "odd.pt", model, ["a", "b"])
    state = torch.load(tmp_path / "odd.pt", weights_only=True)
    state["model_config"]["widths"] = [8]  # weights no longer fit the config
    torch.save(state, tmp_path / "odd.pt")
    _one_line_error(
        capsys, main(["onnx", "--checkpoint", str(tmp_path / "odd.pt")]), "does not fit"
    )


def test_cli_unknown_variant_and_unwritable_output(tiny_checkpoint, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main(["onnx", "--checkpoint", str(tiny_checkpoint), "--variants", "fp32,int4"])
    assert e.value.code == 2 and "unknown variant 'int4'" in capsys.readouterr().err
    blocker = tmp_path / "file"
    blocker.write_text("")
    rc = main(
        [
            "onnx",
            "--checkpoint",
            str(tiny_checkpoint),
            "--variants",
            "fp32",
            "--out-prefix",
            str(blocker / "sub" / "m"),
        ]
    )
    _one_line_error(capsys, rc, "cannot write")
    rc = main(["onnx", "--checkpoint", str(tiny_checkpoint), "--variants", "int8"])
    _one_line_error(capsys, rc, "--data-root")


def tensorrt_available() -> bool:
    from contract.gpu import gpu_info

    try:
        import tensorrt  # noqa: F401
    except Exception:
        return False
    return gpu_info() is not None


@pytest.mark.skipif(tensorrt_available(), reason="TensorRT and a GPU are present")
def test_tensorrt_command_explains_missing_tensorrt(tiny_onnx, tmp_path):
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "export",
            "tensorrt",
            "--onnx",
            str(tiny_onnx),
            "--out",
            str(tmp_path / "e.plan"),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    err = proc.stderr.strip()
    assert proc.returncode == 2 and "Traceback" not in err and err.count("\n") == 0, err
    assert ("TensorRT" in err or "GPU" in err) and "docker/Dockerfile.gpu" in err
    assert not (tmp_path / "e.plan").exists()


def test_engine_compat_check():
    info = {"tensorrt_version": "10.13.0", "compute_capability": "9.0", "gpu_name": "H100"}
    check_engine_compat(info, "10.13.0", "9.0")
    with pytest.raises(EngineMismatchError, match="TensorRT 10.13.0"):
        check_engine_compat(info, "11.0.0", "9.0")
    with pytest.raises(EngineMismatchError, match="compute capability 9.0"):
        check_engine_compat(info, "10.13.0", "8.9")


def test_calibration_never_uses_validation_clips(esc50_root):
    from export.clips import calibration_clips, verification_clips

    val, _ = verification_clips(esc50_root, [], 10)
    held_out = [c.stem for c in val[:5]]
    calib = calibration_clips(esc50_root, held_out, 40)
    assert len(calib) == 40 and not {c.stem for c in calib} & set(held_out)
    assert len({c.target for c in calib}) == 40  # spread over classes first
    chosen, why = verification_clips(esc50_root, held_out, 100)
    assert [c.stem for c in chosen] != [] and {c.stem for c in chosen} == set(held_out)
    assert "held-out" in why


# --------------------------------------------------------------------------- TensorRT (GPU)


@pytest.mark.tensorrt
@pytest.mark.skipif(not tensorrt_available(), reason="needs TensorRT and a CUDA GPU")
def test_tensorrt_engine_matches_onnx(tiny_fp16, tiny_onnx, tmp_path):
    from contract.metadata import read_sidecar
    from contract.tensorrt_runtime import TrtRunner
    from export.tensorrt_build import BuildConfig, build_engine

    engine = build_engine(tiny_fp16, tmp_path / "tiny.plan", BuildConfig(opt_batch=4, max_batch=8))
    meta, info = read_sidecar(engine)
    assert meta.variant == "fp16" and info["profile"]["max"] == [8, N]
    assert (tmp_path / "tiny.timing.cache").stat().st_size > 0
    x = waveforms(11, seed=6)  # more than max_batch: the runner splits it
    with TrtRunner(engine) as run:
        got = run(x)
        np.testing.assert_allclose(run(x[:1]), got[:1], atol=1e-2)
    np.testing.assert_allclose(got, run_onnx(tiny_onnx, x), atol=5e-2, rtol=5e-2)


def test_metadata_extra_keys_may_not_replace_built_in_ones():
    """An int8 note once reused the `calibration` key and silently dropped the temperature."""
    from contract.metadata import ArtifactMetadata, MetadataError

    meta = ArtifactMetadata(
        "m", "1", ["a", "b"], 44100, 220500, {}, calibration={"temperature": 2.0}
    )
    assert ArtifactMetadata.from_props(meta.to_props()).temperature == 2.0
    clashing = ArtifactMetadata("m", "1", ["a"], 44100, 220500, {}, extra={"calibration": "x"})
    with pytest.raises(MetadataError, match="clash"):
        clashing.to_props()
