"""fp32 ONNX -> int8 ONNX for CPU: static QDQ quantisation calibrated on real training clips.

Weights per output channel (symmetric int8), activations per tensor (uint8, MinMax ranges from
the calibration clips): u8 activations x s8 weights is ONNX Runtime's fast path on x86 without
VNNI, where s8 x s8 ran slower than fp32. The front-end (STFT conv, power, mel matmul, dB,
normalisation) is left in FP32: quantising the STFT or the dB scale would cost far more accuracy
than it saves time. So are the CNN's first convolution (it reads the normalised log-mel, whose
outliers an 8-bit range clips) and the classifier: on the shipped model, quantising those two
cost 6 points of held-out accuracy (71.7% top-1 agreement with fp32); keeping them in FP32 gave
97.8% agreement at ~7% more time per clip (87 vs 81 ms, one thread).
Dynamic quantisation is not offered: on this model it was ~4x slower than fp32.
"""

from __future__ import annotations

import logging
import tempfile
from dataclasses import replace
from pathlib import Path

import numpy as np
import onnx
from onnxruntime.quantization import (
    CalibrationDataReader,
    CalibrationMethod,
    QuantFormat,
    QuantType,
    quantize_static,
)

from .errors import ExportError
from .files import writable_path
from .graph import check_int8_layout, frontend_nodes, name_nodes
from .metadata import INPUT_NAME, ArtifactMetadata
from .onnx_export import write_model

log = logging.getLogger(__name__)
CALIBRATION_METHODS = {
    "minmax": CalibrationMethod.MinMax,
    "percentile": CalibrationMethod.Percentile,
}


class WaveformReader(CalibrationDataReader):
    """Feeds (n, clip_samples) float32 waveforms to the calibrator in batches."""

    def __init__(self, waveforms: np.ndarray, batch_size: int = 8):
        self.batches = [waveforms[i : i + batch_size] for i in range(0, len(waveforms), batch_size)]
        self.pos = 0

    def get_next(self) -> dict[str, np.ndarray] | None:
        if self.pos >= len(self.batches):
            return None
        self.pos += 1
        return {INPUT_NAME: np.ascontiguousarray(self.batches[self.pos - 1], dtype=np.float32)}

    def rewind(self) -> None:
        self.pos = 0


def sensitive_nodes(model: onnx.ModelProto) -> list[str]:
    """The CNN's first Conv and its last Gemm/MatMul (the classifier): kept in FP32."""
    frontend = {n.name for n in frontend_nodes(model)}
    cnn = [n for n in model.graph.node if n.name not in frontend]
    first = next((n.name for n in cnn if n.op_type == "Conv"), None)
    last = next((n.name for n in reversed(cnn) if n.op_type in ("Gemm", "MatMul")), None)
    return [name for name in (first, last) if name]


def quantize_int8(
    fp32_path: str | Path,
    out_path: str | Path,
    calibration: np.ndarray,
    meta: ArtifactMetadata,
    method: str = "minmax",
    calibration_info: dict | None = None,
) -> Path:
    """Quantise the fp32 graph at `fp32_path` with `calibration` waveforms (n, clip_samples)."""
    if method not in CALIBRATION_METHODS:
        raise ExportError(
            f"unknown calibration method {method!r} (have {sorted(CALIBRATION_METHODS)})"
        )
    if calibration.ndim != 2 or calibration.shape[1] != meta.clip_samples or not len(calibration):
        raise ExportError(
            f"calibration waveforms must be (n>0, {meta.clip_samples}), got {calibration.shape}"
        )
    out_path = writable_path(out_path)
    model = onnx.load(str(fp32_path))
    name_nodes(model)
    keep_fp32 = [n.name for n in frontend_nodes(model)] + sensitive_nodes(model)
    with tempfile.TemporaryDirectory() as tmp:
        q_path = Path(tmp) / "int8.onnx"
        quiet_root = logging.root.level
        logging.root.setLevel(logging.ERROR)  # ORT nags about pre-processing via the root logger
        try:
            quantize_static(
                model,
                q_path,
                WaveformReader(calibration),
                quant_format=QuantFormat.QDQ,
                per_channel=True,
                activation_type=QuantType.QUInt8,
                weight_type=QuantType.QInt8,
                nodes_to_exclude=keep_fp32,
                calibrate_method=CALIBRATION_METHODS[method],
                extra_options={"ActivationSymmetric": False, "WeightSymmetric": True},
            )
        finally:
            logging.root.setLevel(quiet_root)
        quantized = onnx.load(str(q_path))
    if problems := check_int8_layout(quantized):
        raise ExportError("int8 graph has the wrong layout: " + "; ".join(problems))
    extra = {
        **meta.extra,
        "calibration": {"method": method, "clips": len(calibration), **(calibration_info or {})},
    }
    write_model(quantized, out_path, replace(meta, variant="int8", extra=extra))
    return out_path
