"""ONNX graph inspection shared by export, quantisation and tests. No torch here.

The front-end (STFT conv, power, mel, dB, normalisation) must stay FP32 in every variant. We find
it structurally: the normalisation output is the `Div` whose divisor comes from a `Sqrt`
(`(db - mean) / sqrt(var + eps)`); the front-end is that node and all of its ancestors.
"""

from __future__ import annotations

import onnx
from onnx import TensorProto

from contract.errors import ExportError


def producers(graph: onnx.GraphProto) -> dict[str, int]:
    """Tensor name -> index of the node that makes it. (Indices, not node objects: protobuf
    hands out a fresh wrapper on every access, so object identity means nothing.)"""
    return {out: i for i, node in enumerate(graph.node) for out in node.output}


def normalisation_index(graph: onnx.GraphProto) -> int:
    """The first `Div(x, Sqrt(...))` in the graph: the output of the per-example normalisation."""
    made_by = producers(graph)
    for i, node in enumerate(graph.node):
        if node.op_type == "Div" and len(node.input) == 2:
            divisor = made_by.get(node.input[1])
            if divisor is not None and graph.node[divisor].op_type == "Sqrt":
                return i
    raise ExportError("no normalisation (Div by Sqrt) in the graph: is the front-end inside it?")


def ancestors(graph: onnx.GraphProto, index: int) -> set[int]:
    """Indices of node `index` and of every node it depends on."""
    made_by = producers(graph)
    seen, stack = {index}, [index]
    while stack:
        for name in graph.node[stack.pop()].input:
            parent = made_by.get(name)
            if parent is not None and parent not in seen:
                seen.add(parent)
                stack.append(parent)
    return seen


def frontend_indices(model: onnx.ModelProto) -> set[int]:
    return ancestors(model.graph, normalisation_index(model.graph))


def frontend_nodes(model: onnx.ModelProto) -> list[onnx.NodeProto]:
    """The front-end's nodes (STFT .. normalisation output), in graph order."""
    keep = frontend_indices(model)
    return [n for i, n in enumerate(model.graph.node) if i in keep]


def name_nodes(model: onnx.ModelProto) -> None:
    """Give every unnamed node a unique name (quantisation excludes nodes by name)."""
    taken = {n.name for n in model.graph.node if n.name}
    for i, node in enumerate(model.graph.node):
        if not node.name:
            name = f"{node.op_type}_{i}"
            while name in taken:
                name += "_"
            node.name = name
            taken.add(name)


def tensor_types(model: onnx.ModelProto) -> dict[str, int]:
    """Element type of every named tensor, after ONNX shape inference."""
    inferred = onnx.shape_inference.infer_shapes(model)
    g = inferred.graph
    types = {v.name: v.type.tensor_type.elem_type for v in [*g.input, *g.output, *g.value_info]}
    types.update({t.name: t.data_type for t in g.initializer})
    for node in g.node:  # Constant nodes carry their type in the attribute
        if node.op_type == "Constant" and node.attribute and node.attribute[0].t.name is not None:
            types.setdefault(node.output[0], node.attribute[0].t.data_type)
    return types


def check_fp16_layout(model: onnx.ModelProto) -> list[str]:
    """Problems with the mixed-precision layout (empty list: fine).

    Wanted: FP32 waveform in, FP32 logits out, every front-end tensor FP32 up to and including the
    normalisation output, and FP16 convolutions after it.
    """
    types = tensor_types(model)
    problems = []
    g = model.graph
    for v in [*g.input, *g.output]:
        if v.type.tensor_type.elem_type != TensorProto.FLOAT:
            problems.append(f"graph {v.name!r} is not float32")
    for node in frontend_nodes(model):
        for name in [*node.input, *node.output]:
            if types.get(name) == TensorProto.FLOAT16:
                problems.append(f"front-end {node.op_type} {node.name!r} touches FP16 {name!r}")
    frontend = frontend_indices(model)
    fp16_convs = [
        n
        for i, n in enumerate(g.node)
        if i not in frontend
        and n.op_type == "Conv"
        and types.get(n.input[1]) == TensorProto.FLOAT16
    ]
    if not fp16_convs:
        problems.append("no FP16 convolution after the front-end")
    return problems


QDQ_OPS = {"QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear"}


def check_int8_layout(model: onnx.ModelProto) -> list[str]:
    """Problems with a QDQ graph (empty list: fine): front-end unquantised, CNN quantised."""
    problems = [
        f"front-end {n.op_type} {n.name!r} is quantised"
        for n in frontend_nodes(model)
        if n.op_type in QDQ_OPS or n.domain == "com.microsoft"
    ]
    made_by = producers(model.graph)
    quantised_convs = [
        n
        for n in model.graph.node
        if n.op_type == "Conv"
        and (w := made_by.get(n.input[1])) is not None
        and model.graph.node[w].op_type == "DequantizeLinear"
    ]
    if not quantised_convs:
        problems.append("no quantised (DequantizeLinear-fed) convolution")
    return problems
