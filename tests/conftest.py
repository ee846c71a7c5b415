"""Shared fixtures: the real ESC-50 clips when ../shared is present, generated audio otherwise."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from train.data import DEFAULT_DATA_ROOT

REPO = Path(__file__).resolve().parent.parent
ESC50 = Path(os.environ.get("ESC50_ROOT", REPO / DEFAULT_DATA_ROOT))


@pytest.fixture(scope="session", autouse=True)
def no_user_esc50_settings() -> Iterator[None]:
    """The tests run the settings they name: ESC50_* variables of the user's shell (an
    ESC50_API_TOKEN would make every unauthenticated request a 401) are hidden from
    Settings() and from every server a test starts. ESC50_ROOT was read above already."""
    with pytest.MonkeyPatch.context() as mp:
        for name in [k for k in os.environ if k.startswith("ESC50_")]:
            mp.delenv(name)
        # no gRPC on Triton's port 8001 for every test server; gRPC tests pick a free port
        mp.setenv("ESC50_GRPC_PORT", "0")
        yield


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


def waveforms(batch: int, seed: int = 0, samples: int = 220500) -> np.ndarray:
    """Noise with a tone at different levels per clip (the default clip: 5 s at 44.1 kHz): the
    front-end sees realistic dynamics, the quantiser a realistic range."""
    rng = np.random.default_rng(seed)
    t = np.arange(samples) / 44100
    x = rng.standard_normal((batch, samples)).astype(np.float32) * rng.uniform(
        0.01, 0.3, (batch, 1)
    )
    for i in range(batch):
        x[i] += 0.3 * np.sin(2 * np.pi * rng.uniform(100, 8000) * t)
    return x.astype(np.float32)


@pytest.fixture(scope="session")
def tiny_meta(tiny_checkpoint):
    from export.onnx_export import metadata_from_checkpoint
    from train.checkpoint import load_checkpoint

    return metadata_from_checkpoint(load_checkpoint(tiny_checkpoint), tiny_checkpoint, "tiny")


@pytest.fixture(scope="session")
def tiny_fp16(tiny_checkpoint, tiny_meta, tmp_path_factory) -> Path:
    """The tiny checkpoint exported as the fp16 graph (fp32 front-end, fp16 CNN)."""
    from export.onnx_export import export_onnx
    from train.checkpoint import load_checkpoint, model_from_checkpoint

    model = model_from_checkpoint(load_checkpoint(tiny_checkpoint))
    out = tmp_path_factory.mktemp("fp16") / "tiny.fp16.onnx"
    return export_onnx(model, out, tiny_meta, "fp16")


@pytest.fixture(scope="session")
def tiny_int8(tiny_onnx, tiny_meta, tmp_path_factory) -> Path:
    """tiny.fp32.onnx quantised to int8 by the real quantiser, calibrated on 8 waveforms."""
    from export.quantize import quantize_int8

    out = tmp_path_factory.mktemp("int8") / "tiny.int8.onnx"
    return quantize_int8(tiny_onnx, out, waveforms(8, seed=1), tiny_meta)


@pytest.fixture(scope="session")
def tiny_explain_onnx(tiny_checkpoint, tiny_onnx) -> Path:
    """The tiny checkpoint's explain artifact, beside tiny.fp32.onnx (where the service looks)."""
    from export.onnx_export import export_explain, metadata_from_checkpoint
    from train.checkpoint import load_checkpoint, model_from_checkpoint

    ckpt = load_checkpoint(tiny_checkpoint)
    meta = metadata_from_checkpoint(ckpt, tiny_checkpoint, model_name="tiny")
    out = tiny_onnx.with_name("tiny.explain.onnx")
    return export_explain(model_from_checkpoint(ckpt), out, meta)
