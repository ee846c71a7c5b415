"""Every node of the fp16 graph (the one TensorRT engines are built from) against TensorRT's ONNX
parser support matrix: operator, opset, tensor types and the attributes the parser restricts.
TensorRT cannot run on CPU CI; this catches an unsupported op before a GPU build does.

The matrix is vendored in tests/fixtures (its file names the TensorRT version and source)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from contract.metadata import read_onnx_metadata
from export.graph import tensor_types

MATRIX_PATH = Path(__file__).parent / "fixtures" / "tensorrt-10.15-onnx-operators.json"
TYPE_NAMES = {
    TensorProto.FLOAT: "FP32",
    TensorProto.FLOAT16: "FP16",
    TensorProto.BFLOAT16: "BF16",
    TensorProto.INT32: "INT32",
    TensorProto.INT64: "INT64",
    TensorProto.INT8: "INT8",
    TensorProto.UINT8: "UINT8",
    TensorProto.BOOL: "BOOL",
    TensorProto.DOUBLE: "DOUBLE",
}
PAD_MODES = {"constant", "reflect", "edge"}  # ISliceLayer kFILL / kREFLECT / kCLAMP
CONSTANT_INPUTS = {  # op -> index of the input the parser needs as a build-time constant
    "Squeeze": 1,
    "Unsqueeze": 1,
    **{
        op: 1
        for op in (
            "ReduceL1",
            "ReduceL2",
            "ReduceLogSum",
            "ReduceLogSumExp",
            "ReduceMax",
            "ReduceMean",
            "ReduceMin",
            "ReduceProd",
            "ReduceSum",
            "ReduceSumSquare",
        )
    },
}


@pytest.fixture(scope="module")
def matrix() -> dict:
    return json.loads(MATRIX_PATH.read_text())


def parser_problems(model: onnx.ModelProto, matrix: dict) -> list[str]:
    """What TensorRT's ONNX parser (as the matrix describes it) would refuse; empty: none."""
    low, high = matrix["opset"]
    problems = [
        f"opset {o.version} outside TensorRT's {low}..{high}"
        for o in model.opset_import
        if o.domain in ("", "ai.onnx") and not low <= o.version <= high
    ]
    types = tensor_types(model)
    constants = {t.name for t in model.graph.initializer}
    constants |= {o for n in model.graph.node if n.op_type == "Constant" for o in n.output}
    for node in model.graph.node:
        problems += _node_problems(node, matrix, types, constants)
    return problems


def _node_problems(node, matrix: dict, types: dict, constants: set[str]) -> list[str]:
    where = f"{node.op_type} {node.name!r}"
    if node.domain not in ("", "ai.onnx"):
        return [f"{where}: custom domain {node.domain!r}"]
    supported = matrix["types"].get(node.op_type)
    if supported is None:
        return [f"{where}: not in TensorRT {matrix['tensorrt']}'s ONNX operator matrix"]
    out = []
    for name in [*node.input, *node.output]:
        kind = TYPE_NAMES.get(types.get(name, TensorProto.FLOAT), "other")
        if name and kind not in supported:
            out.append(f"{where}: {name!r} is {kind}, TensorRT takes {', '.join(supported)}")
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    if node.op_type == "Pad":
        mode = attrs.get("mode", b"constant").decode()
        if mode not in PAD_MODES:
            out.append(f"{where}: mode {mode!r} (TensorRT: {sorted(PAD_MODES)})")
    if node.op_type in ("MaxPool", "AveragePool"):
        if len(attrs.get("kernel_shape", [])) not in (2, 3) or len(node.output) > 1:
            out.append(f"{where}: only 2D/3D pooling without the Indices output")
        if any(d != 1 for d in attrs.get("dilations", [])):
            out.append(f"{where}: dilations must be 1")
    if node.op_type == "Conv" and len(node.input) > 1 and node.input[1] not in constants:
        out.append(f"{where}: weights are not an initializer")
    index = CONSTANT_INPUTS.get(node.op_type)
    if index is not None and len(node.input) > index and node.input[index] not in constants:
        out.append(f"{where}: input {index} (axes) is not a build-time constant")
    return out


def test_the_matrix_names_its_version_and_source(matrix: dict) -> None:
    assert matrix["tensorrt"].startswith("10.") and "onnx-tensorrt" in matrix["source"]
    assert {"Conv", "MatMul", "Pad", "Log"} <= set(matrix["types"])
    assert "QLinearConv" in matrix["unsupported"] and "DFT" in matrix["unsupported"]


def test_fp16_graph_uses_only_what_tensorrt_parses(tiny_fp16: Path, matrix: dict) -> None:
    model = onnx.load(str(tiny_fp16))
    assert parser_problems(model, matrix) == []
    ops = {n.op_type for n in model.graph.node}
    assert {"Pad", "Conv", "MatMul", "Transpose", "Cast"} <= ops  # the front-end is in the graph
    pads = [n for n in model.graph.node if n.op_type == "Pad"]
    assert [helper.get_attribute_value(a) for n in pads for a in n.attribute] == [b"reflect"]


@pytest.mark.slow
def test_shipped_model_fp16_graph(repo_root: Path, matrix: dict, tmp_path: Path) -> None:
    """The shipped model's fp16 graph (ResNet-34, the shipped front-end): the one `make export`
    wrote if there is one, else exported here from the committed checkpoint (seconds), so the
    full-size graph is checked in every clone, not only where it was exported."""
    path = repo_root / "models" / "esc50-resnet34.fp16.onnx"
    if not path.is_file():
        path = export_fp16(repo_root / "models" / "esc50-resnet34.pt", tmp_path)
    model = onnx.load(str(path))
    assert parser_problems(model, matrix) == []
    cfg = read_onnx_metadata(path).model_config  # every CNN convolution is in the graph:
    cnn_convs = 1 + 2 * sum(cfg["depths"]) + len(cfg["widths"]) - 1  # stem, blocks, shortcuts
    assert sum(n.op_type == "Conv" for n in model.graph.node) >= cnn_convs


def export_fp16(checkpoint: Path, out_dir: Path) -> Path:
    from export.onnx_export import export_onnx, metadata_from_checkpoint
    from train.checkpoint import load_checkpoint, model_from_checkpoint

    ckpt = load_checkpoint(checkpoint)
    meta = metadata_from_checkpoint(ckpt, checkpoint, model_name=checkpoint.stem)
    out = out_dir / f"{checkpoint.stem}.fp16.onnx"
    return export_onnx(model_from_checkpoint(ckpt), out, meta, variant="fp16")


def test_the_check_catches_what_tensorrt_would_refuse(tiny_fp16: Path, matrix: dict) -> None:
    model = onnx.load(str(tiny_fp16))
    pad = next(n for n in model.graph.node if n.op_type == "Pad")
    next(a for a in pad.attribute if a.name == "mode").s = b"wrap"
    log = next(n for n in model.graph.node if n.op_type == "Log")
    model.graph.node.append(helper.make_node("DFT", [log.output[0]], ["spectrum"], name="dft"))
    x = onnx.numpy_helper.from_array(np.zeros(2, np.float64), "doubles")
    model.graph.initializer.append(x)
    model.graph.node.append(helper.make_node("Abs", ["doubles"], ["abs_doubles"], name="abs64"))
    problems = "\n".join(parser_problems(model, matrix))
    assert "mode 'wrap'" in problems
    assert "DFT 'dft': not in TensorRT" in problems
    assert "Abs 'abs64': 'doubles' is DOUBLE" in problems
