"""Shared fixtures: the real ESC-50 clips when ../shared is present, generated audio otherwise."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from train.data import DEFAULT_DATA_ROOT

REPO = Path(__file__).resolve().parent.parent
ESC50 = Path(os.environ.get("ESC50_ROOT", REPO / DEFAULT_DATA_ROOT))


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO


@pytest.fixture(scope="session")
def esc50_root() -> Path:
    if not (ESC50 / "meta" / "esc50.csv").is_file():
        pytest.skip(f"ESC-50 clips not present at {ESC50} (set ESC50_ROOT)")
    return ESC50


@pytest.fixture(scope="session")
def synthetic_esc50(tmp_path_factory) -> Path:
    """12 generated clips (3 classes, folds 1-2, WAV/FLAC/Ogg) in the ESC-50 layout."""
    from synth import make_dataset

    return make_dataset(tmp_path_factory.mktemp("esc50"))


# --------------------------------------------------------------------------- export fixtures
# A tiny classifier (2 stages, 8/16 channels, 5 classes), random but seeded weights, exported
# with the real exporter and full metadata. Shared by the export and service tests.

TINY_LABELS = ["dog", "rain", "crying_baby", "door_wood_knock", "helicopter"]


def _tiny_model():
    import torch

    from train.model import AudioClassifier, ModelConfig

    torch.manual_seed(0)
    model = AudioClassifier(ModelConfig(n_classes=len(TINY_LABELS), widths=(8, 16), depths=(1, 1)))
    with torch.no_grad():  # non-trivial BatchNorm statistics, so folding them is exercised
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 1.5)
                m.weight.uniform_(0.5, 1.5)
    return model.eval()


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> Path:
    """A saved tiny checkpoint (train.checkpoint format) with labels, configs and val_stems."""
    from train.checkpoint import save_checkpoint

    path = tmp_path_factory.mktemp("tiny") / "tiny.pt"
    save_checkpoint(
        path,
        _tiny_model(),
        TINY_LABELS,
        train_config={"epochs": 0},
        data={"clips": 0, "val_stems": []},
        metrics={"val_acc": 0.2},
    )
    return path


@pytest.fixture(scope="session")
def tiny_onnx(tiny_checkpoint) -> Path:
    """The tiny checkpoint exported to an fp32 ONNX file with full metadata."""
    from export.onnx_export import export_onnx, metadata_from_checkpoint
    from train.checkpoint import load_checkpoint, model_from_checkpoint

    ckpt = load_checkpoint(tiny_checkpoint)
    meta = metadata_from_checkpoint(ckpt, tiny_checkpoint, model_name="tiny")
    out = tiny_checkpoint.with_name("tiny.fp32.onnx")
    return export_onnx(model_from_checkpoint(ckpt), out, meta, variant="fp32")


@pytest.fixture(scope="session")
def tiny_explain_onnx(tiny_checkpoint, tiny_onnx) -> Path:
    """The tiny checkpoint's explain artifact, beside tiny.fp32.onnx (where the service looks)."""
    from export.onnx_export import export_explain, metadata_from_checkpoint
    from train.checkpoint import load_checkpoint, model_from_checkpoint

    ckpt = load_checkpoint(tiny_checkpoint)
    meta = metadata_from_checkpoint(ckpt, tiny_checkpoint, model_name="tiny")
    out = tiny_onnx.with_name("tiny.explain.onnx")
    return export_explain(model_from_checkpoint(ckpt), out, meta)
