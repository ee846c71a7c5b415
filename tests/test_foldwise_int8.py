"""The fold-wise int8 gate in miniature: a 2-fold "CV run" of tiny models on generated clips,
exported and quantised per fold; the gate passes an int8 graph that is the fp32 model, fails a
broken one, and its figures (accuracy, agreement, logit gap) are what the logits say."""

import json

import numpy as np
import pytest
import torch

from contract.errors import VerificationFailed
from export.foldwise import FoldwiseGate, figures, judge, pool, run_foldwise
from export.onnx_export import export_onnx
from train.checkpoint import save_checkpoint
from train.data import load_waveforms, select
from train.model import AudioClassifier, ModelConfig
from train.train import TrainConfig, prepare_data


def fitted_tiny_model(root, labels) -> AudioClassifier:
    """A random tiny CNN whose last layer is solved (ridge regression) to name every clip's class:
    an fp32 model with 100 % accuracy, so a broken int8 graph visibly loses accuracy."""
    torch.manual_seed(0)
    model = AudioClassifier(ModelConfig(n_classes=len(labels), widths=(8, 16), depths=(1, 1)))
    model.eval()
    clips = select(root).clips
    with torch.no_grad():
        _, maps = model.cnn(model.frontend(torch.from_numpy(load_waveforms(clips))), True)
        pooled = torch.flatten(model.cnn.pool(maps["stage2"]), 1).double()
        x = torch.cat([pooled, torch.ones(len(clips), 1, dtype=torch.double)], 1)
        y = 10.0 * torch.eye(len(labels), dtype=torch.double)[[c.target for c in clips]]
        # ridge: the tones' features are nearly collinear, and a plain least-squares fit with
        # huge weights would turn float noise into different answers
        ridge = 1e-5 * x.pow(2).sum() / len(x) * torch.eye(x.shape[1], dtype=torch.double)
        w = torch.linalg.solve(x.T @ x + ridge, x.T @ y)  # (features + 1, classes)
        model.cnn.fc.weight.copy_(w[:-1].T.float())
        model.cnn.fc.bias.copy_(w[-1].float())
    return model


@pytest.fixture(scope="module")
def cv_dir(synthetic_esc50, tmp_path_factory):
    """cv/recipe/fold{0,1}/final.pt as `python -m train cv --k 2` lays them out."""
    out = tmp_path_factory.mktemp("cv")
    labels = select(synthetic_esc50).labels
    model = fitted_tiny_model(synthetic_esc50, labels)
    for k in range(2):
        cfg = TrainConfig(data_root=str(synthetic_esc50), cv_folds=2, cv_index=k)
        _, train_clips, val_clips, data = prepare_data(cfg)
        save_checkpoint(out / "recipe" / f"fold{k}" / "final.pt", model, labels, data=data)
    return out


def same_model(fp32, out, calibration, meta, method, info, keep_fp32):
    """'Quantisation' that changes nothing: the int8 slot holds the fp32 graph."""
    out.write_bytes(fp32.read_bytes())
    return out


def broken_quantizer(synthetic_esc50):
    """An int8 slot holding the model with its classes shifted by one: always wrong."""
    labels = select(synthetic_esc50).labels
    broken = fitted_tiny_model(synthetic_esc50, labels)
    with torch.no_grad():
        broken.cnn.fc.weight.copy_(broken.cnn.fc.weight.roll(1, 0))
        broken.cnn.fc.bias.copy_(broken.cnn.fc.bias.roll(1, 0))

    exported: list[bytes] = []  # exported once, written for every fold

    def quantize(fp32, out, calibration, meta, method, info, keep_fp32):
        if not exported:
            exported.append(export_onnx(broken, out, meta, "fp32").read_bytes())
        out.write_bytes(exported[0])
        return out

    return quantize


def test_figures_and_pooling_follow_the_logits():
    fp32 = np.array([[3.0, 0, 0], [0, 2, 0], [0, 0, 1], [1, 0, 0]])
    int8 = np.array([[2.5, 0, 0], [0, 0, 2.5], [0, 0, 1], [0, 0, 1.5]])
    targets = np.array([0, 1, 2, 1])
    f = figures(fp32, int8, targets)
    assert (f["fp32_correct"], f["int8_correct"], f["agree"]) == (3, 2, 2)
    assert f["top1_agreement"] == 0.5 and f["max_abs_logit_diff"] == 2.5
    g = figures(fp32[:2], fp32[:2], targets[:2])
    p = pool([f, g])
    assert p["clips"] == 6 and p["fp32_accuracy"] == 5 / 6 and p["int8_accuracy"] == 4 / 6
    assert p["top1_agreement"] == 4 / 6 and p["max_abs_logit_diff"] == 2.5
    assert judge(p, FoldwiseGate(0.2)) == []
    assert "16.67 points below fp32" in judge(p, FoldwiseGate(0.005))[0]


def test_gate_passes_when_int8_is_the_fp32_model(cv_dir, synthetic_esc50, tmp_path):
    report = run_foldwise(cv_dir, synthetic_esc50, tmp_path / "fw", quantize=same_model)
    p = report["pooled"]
    assert report["passed"] and p["clips"] == 12
    assert p["fp32_accuracy"] == p["int8_accuracy"] == 1.0
    assert p["top1_agreement"] == 1.0 and p["max_abs_logit_diff"] == 0.0
    for k, fold in enumerate(report["folds"]):
        data = torch.load(cv_dir / "recipe" / f"fold{k}" / "final.pt", weights_only=True)["data"]
        assert fold["clips"] == len(data["val_stems"])
        # calibration: that fold's training clips only
        assert set(fold["calibration_stems"]) <= set(data["train_stems"])
        assert not set(fold["calibration_stems"]) & set(data["val_stems"])
    assert json.loads((tmp_path / "fw.json").read_text())["passed"]
    assert "PASSED" in (tmp_path / "fw.md").read_text()


def test_gate_fails_when_int8_is_broken(cv_dir, synthetic_esc50, tmp_path):
    with pytest.raises(VerificationFailed, match="points below fp32"):
        run_foldwise(
            cv_dir, synthetic_esc50, tmp_path / "fw", quantize=broken_quantizer(synthetic_esc50)
        )
    report = json.loads((tmp_path / "fw.json").read_text())  # written before failing
    p = report["pooled"]
    assert not report["passed"] and p["fp32_accuracy"] == 1.0 and p["int8_accuracy"] < 0.5
    assert p["top1_agreement"] == p["int8_accuracy"]  # wrong exactly where it disagrees
    assert "FAILED" in (tmp_path / "fw.md").read_text()


def test_cli_quantises_each_fold_for_real_and_checks_a_report(cv_dir, synthetic_esc50, tmp_path):
    from export.__main__ import main

    out = tmp_path / "real"
    args = ["foldwise-int8", "--cv-dir", str(cv_dir), "--data-root", str(synthetic_esc50)]
    assert (
        main([*args, "--out", str(out), "--calibration-clips", "4", "--max-accuracy-drop", "1"])
        == 0
    )
    report = json.loads(out.with_suffix(".json").read_text())
    p = report["pooled"]
    assert report["passed"] and p["clips"] == 12 and p["fp32_accuracy"] == 1.0
    assert 0.0 <= p["top1_agreement"] <= 1.0 and p["finite"]
    assert all(len(f["calibration_stems"]) == 4 for f in report["folds"])
    assert all(f["fp32_vs_pytorch_max_abs"] is None for f in report["folds"])  # no val_logits
    assert main(["foldwise-int8", "--check", str(out.with_suffix(".json"))]) == 0
    failed = tmp_path / "failed.json"
    failed.write_text(json.dumps({**report, "passed": False, "failures": ["int8 lost 2 points"]}))
    assert main(["foldwise-int8", "--check", str(failed)]) == 1
    assert main(["foldwise-int8", "--check", str(tmp_path / "absent.json")]) == 2
