"""fp32 ONNX -> int8 ONNX for CPU: static QDQ quantisation calibrated on real training clips.

Weights per output channel (symmetric int8), activations per tensor (uint8, ranges from the
calibration clips): u8 activations x s8 weights is ONNX Runtime's fast path on x86, with VNNI
or without. The front-end (STFT, power, mel, dB, normalisation) stays FP32: quantising the STFT
or the dB scale would cost far more accuracy than it saves time. So does the classifier (a
512 x 50 Gemm: no time to win).

Everything from the normalised log-mel to the pooled features is quantised, the stem conv
included: the activation quantisation then sits before the stem's MaxPool (max commutes with a
monotone quantiser) and ONNX Runtime runs the whole CNN in NHWC (QLinearConv, NhwcMaxPool,
QLinearAdd) with one Transpose in and one out; with the stem in FP32 the graph gets an FP32
conv, a ReorderOutput, an NCHW uint8 MaxPool and Transposes around every residual Add of
stage 1. The speed that results is in loadtests/reports/bench.md (`make bench`, raw ONNX
Runtime fp32 vs int8 clips/s).
Percentile ranges (99.999 %) instead of MinMax keep it accurate: a few outlier activations
would otherwise stretch a tensor's range over the 8 bits. On the shipped model and all 651
local clips, int8 top-1 agreement with PyTorch is in models/esc50-resnet34.verify.md
(`make verify`: 100 %). `fp32_islands` lists what ONNX Runtime still runs outside int8 between
quantised ops; tests keep it empty.
Dynamic quantisation is not offered: it computes each activation's range at run time and goes
back to float after every op (ConvInteger), where static QDQ runs the whole CNN in int8.
"""

from __future__ import annotations

import contextlib
import io
import logging
import tempfile
from collections.abc import Collection
from dataclasses import replace
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnxruntime.quantization import (
    CalibrationDataReader,
    CalibrationMethod,
    QuantFormat,
    QuantType,
    quantize_static,
)

from contract.errors import ExportError
from contract.files import writable_path
from contract.metadata import INPUT_NAME, ArtifactMetadata

from .graph import check_int8_layout, frontend_nodes, name_nodes
from .onnx_export import write_model

log = logging.getLogger(__name__)
CALIBRATION_METHODS = {
    "minmax": CalibrationMethod.MinMax,
    "percentile": CalibrationMethod.Percentile,
}
KEEP_FP32 = ("classifier",)  # CNN parts left in FP32 by default ("stem", "classifier")


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


def sensitive_nodes(model: onnx.ModelProto) -> dict[str, str]:
    """The CNN's first Conv ("stem") and last Gemm/MatMul ("classifier"): part -> node name."""
    frontend = {n.name for n in frontend_nodes(model)}
    cnn = [n for n in model.graph.node if n.name not in frontend]
    first = next((n.name for n in cnn if n.op_type == "Conv"), None)
    last = next((n.name for n in reversed(cnn) if n.op_type in ("Gemm", "MatMul")), None)
    return {part: name for part, name in (("stem", first), ("classifier", last)) if name}


def quantize_int8(
    fp32_path: str | Path,
    out_path: str | Path,
    calibration: np.ndarray,
    meta: ArtifactMetadata,
    method: str = "percentile",
    calibration_info: dict | None = None,
    keep_fp32: Collection[str] = KEEP_FP32,
) -> Path:
    """Quantise the fp32 graph at `fp32_path` with `calibration` waveforms (n, clip_samples).

    `keep_fp32` names CNN parts left unquantised besides the front-end: "stem", "classifier".
    """
    if unknown := set(keep_fp32) - {"stem", "classifier"}:
        raise ExportError(f"unknown CNN parts to keep in FP32: {sorted(unknown)}")
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
    parts = sensitive_nodes(model)
    excluded = [n.name for n in frontend_nodes(model)] + [parts[p] for p in keep_fp32 if p in parts]
    with tempfile.TemporaryDirectory() as tmp:
        q_path = Path(tmp) / "int8.onnx"
        quiet_root = logging.root.level
        logging.root.setLevel(logging.ERROR)  # ORT nags about pre-processing via the root logger
        try:  # and its percentile calibrator prints to stdout
            with contextlib.redirect_stdout(io.StringIO()):
                quantize_static(
                    model,
                    q_path,
                    WaveformReader(calibration),
                    quant_format=QuantFormat.QDQ,
                    per_channel=True,
                    activation_type=QuantType.QUInt8,
                    weight_type=QuantType.QInt8,
                    nodes_to_exclude=excluded,
                    calibrate_method=CALIBRATION_METHODS[method],
                    extra_options={"ActivationSymmetric": False, "WeightSymmetric": True},
                )
        finally:
            logging.root.setLevel(quiet_root)
        quantized = onnx.load(str(q_path))
    if problems := check_int8_layout(quantized):
        raise ExportError("int8 graph has the wrong layout: " + "; ".join(problems))
    # "int8_" keys: the metadata's own `calibration` is the model's temperature, not this
    extra = {
        **meta.extra,
        "int8_calibration": {
            "method": method,
            "clips": len(calibration),
            **(calibration_info or {}),
        },
        "int8_fp32_parts": sorted(keep_fp32),
    }
    write_model(quantized, out_path, replace(meta, variant="int8", extra=extra))
    return out_path


QUANTISED_KERNELS = {"QLinearConv", "QLinearAdd", "NhwcMaxPool", "QLinearGlobalAveragePool"}


def fp32_islands(path: str | Path) -> list[str]:
    """What ONNX Runtime's CPU provider runs between quantised kernels, after its own graph
    optimisations (layout changes included): empty when the CNN runs int8 from end to end.

    An island is a layout change (Transpose, ReorderInput/Output) between two quantised
    kernels, or a DequantizeLinear whose FP32 result is quantised again.
    """
    with tempfile.TemporaryDirectory() as tmp:
        opts = ort.SessionOptions()
        opts.optimized_model_filepath = str(Path(tmp) / "optimized.onnx")
        opts.log_severity_level = 3  # it warns that the saved graph is machine-specific: it is
        ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        graph = onnx.load(opts.optimized_model_filepath).graph
    made_by = {out: n for n in graph.node for out in n.output}
    used_by: dict[str, list[onnx.NodeProto]] = {}
    for n in graph.node:
        for name in n.input:
            used_by.setdefault(name, []).append(n)
    problems = []
    for n in graph.node:
        before = made_by.get(n.input[0]) if n.input else None
        after = used_by.get(n.output[0], [])
        if n.op_type in ("Transpose", "ReorderInput", "ReorderOutput"):
            if (
                before is not None
                and before.op_type in QUANTISED_KERNELS
                and any(m.op_type in QUANTISED_KERNELS for m in after)
            ):
                problems.append(f"{n.op_type} {n.name!r} between quantised kernels")
        elif n.op_type == "DequantizeLinear" and _requantised(n, used_by):
            problems.append(f"FP32 island after {n.name!r}")
    return problems


def _requantised(dq: onnx.NodeProto, used_by: dict[str, list[onnx.NodeProto]]) -> bool:
    """Whether the FP32 output of `dq` reaches a QuantizeLinear (an FP32 stretch mid-CNN)."""
    stack, seen = [dq.output[0]], set()
    while stack:
        for node in used_by.get(stack.pop(), []):
            if node.op_type == "QuantizeLinear":
                return True
            if node.name not in seen:
                seen.add(node.name)
                stack.extend(node.output)
    return False
