"""The Open Inference Protocol's tensors on the wire, both ways. Pure functions: no FastAPI, no
gRPC. REST's JSON and binary bodies are parsed and built here; service/v2/grpc_server.py maps
its protobuf messages onto the same `Tensor` / `RequestedOutput` types and calls the same checks.

A request carries one input, either of:
  audio     BYTES [n]             n encoded audio files (any format /v1/classify takes)
  waveform  FP32  [n, clip]       n mono waveforms at the model's rate (5 s at 44.1 kHz)
and asks for any of the outputs (all when it names none), FP32 [n, classes]:
  probabilities   calibrated, the mean over a clip's windows (what /v1/classify answers)
  logits          the mean of the windows' logits (one window: the model's logits)
An output with `parameters.classification: k` becomes BYTES [n, k] of "value:index:label",
best first (the classification extension). Binary data (the binary tensor data extension):
BYTES elements are each a 4-byte little-endian length then the bytes; FP32 is little-endian.
"""

from __future__ import annotations

import base64
import binascii
import json
import math
import struct
from dataclasses import dataclass
from typing import Any

import numpy as np

from contract.metadata import INPUT_NAME, OUTPUT_NAME, ArtifactMetadata
from service.errors import ServiceError

AUDIO_INPUT = "audio"
WAVEFORM_INPUT = INPUT_NAME  # the graph's own input name: a Triton config of it takes the same
PROBABILITIES, LOGITS = "probabilities", OUTPUT_NAME
OUTPUTS = (PROBABILITIES, LOGITS)
HEADER_LENGTH = "Inference-Header-Content-Length"
_LENGTH = struct.Struct("<I")  # a BYTES element's length prefix


class BadTensor(ServiceError):
    """A request the protocol calls invalid (v2: 400, gRPC: INVALID_ARGUMENT)."""

    status, code = 400, "bad_request"


@dataclass(frozen=True)
class Tensor:
    name: str
    datatype: str  # "BYTES" | "FP32"
    shape: tuple[int, ...]
    value: Any  # FP32: np.ndarray of `shape`; BYTES: list[bytes], row-major


@dataclass(frozen=True)
class RequestedOutput:
    name: str
    classification: int = 0  # > 0: top-k "value:index:label" strings instead of the tensor
    binary: bool | None = None  # REST: binary data for this output; None = the request's default


@dataclass(frozen=True)
class InferRequest:
    input: Tensor
    outputs: tuple[RequestedOutput, ...] = ()  # () = every output
    id: str = ""
    binary_outputs: bool = False  # REST: the request-level `binary_data_output`


def input_metadata(meta: ArtifactMetadata) -> list[dict[str, Any]]:
    return [
        {"name": AUDIO_INPUT, "datatype": "BYTES", "shape": [-1]},
        {"name": WAVEFORM_INPUT, "datatype": "FP32", "shape": [-1, meta.clip_samples]},
    ]


def output_metadata(meta: ArtifactMetadata) -> list[dict[str, Any]]:
    return [{"name": n, "datatype": "FP32", "shape": [-1, len(meta.labels)]} for n in OUTPUTS]


# --- inputs ----------------------------------------------------------------------------------


def check_input(name: str, datatype: str, shape: list[int] | tuple[int, ...], meta) -> int:
    """The element count of a valid input declaration; BadTensor says what is wrong."""
    expected = {AUDIO_INPUT: "BYTES", WAVEFORM_INPUT: "FP32"}
    if name not in expected:
        raise BadTensor(
            f"unknown input {name!r}: this model takes {AUDIO_INPUT!r} (BYTES [-1], encoded "
            f"audio files) or {WAVEFORM_INPUT!r} (FP32 [-1, {meta.clip_samples}])"
        )
    if datatype != expected[name]:
        raise BadTensor(f"input {name!r} must be {expected[name]}, got {datatype}")
    if not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape):
        raise BadTensor(f"input {name!r}: shape {list(shape)} must be non-negative integers")
    shape = list(shape)
    if name == AUDIO_INPUT and not (len(shape) == 1 or (len(shape) == 2 and shape[1] == 1)):
        raise BadTensor(f"input {name!r}: shape {shape}, expected [n] (or [n, 1])")
    if name == WAVEFORM_INPUT and (len(shape) != 2 or shape[1] != meta.clip_samples):
        raise BadTensor(f"input {name!r}: shape {shape}, expected [n, {meta.clip_samples}]")
    if shape[0] < 1:
        raise BadTensor(f"input {name!r} has no elements (shape {shape})")
    return math.prod(shape)


def tensor_from_raw(name: str, datatype: str, shape: list[int], raw: bytes, meta) -> Tensor:
    """An input sent as binary data (REST's binary extension, gRPC's raw_input_contents)."""
    count = check_input(name, datatype, shape, meta)
    if datatype == "BYTES":
        return _bytes_tensor(name, shape, split_bytes(raw, name), count)
    if len(raw) != 4 * count:
        raise BadTensor(
            f"input {name!r}: shape {list(shape)} needs {4 * count} bytes of FP32, got {len(raw)}"
        )
    return _fp32_tensor(name, shape, np.frombuffer(raw, dtype="<f4"))


def tensor_from_values(
    name: str, datatype: str, shape: list[int], data: Any, meta, b64: bool = False
) -> Tensor:
    """An input sent as values (REST's JSON `data`, gRPC's `contents`). BYTES values are
    strings (UTF-8), or base64 text where the input's parameters say content_type=base64."""
    count = check_input(name, datatype, shape, meta)
    if datatype == "BYTES":
        elements = [_element_bytes(x, name, b64) for x in _flatten(data)]
        return _bytes_tensor(name, shape, elements, count)
    try:
        values = np.asarray(data, dtype=np.float32).ravel()
    except (TypeError, ValueError):
        raise BadTensor(f"input {name!r}: data must be numbers (FP32)") from None
    if values.size != count:
        raise BadTensor(
            f"input {name!r}: shape {list(shape)} needs {count} values, got {values.size}"
        )
    return _fp32_tensor(name, shape, values)


def _fp32_tensor(name: str, shape: list[int], flat: np.ndarray) -> Tensor:
    bad = np.flatnonzero(~np.isfinite(flat))
    if bad.size:
        raise BadTensor(f"input {name!r} holds NaN or Inf (first at flat index {bad[0]})")
    return Tensor(name, "FP32", tuple(shape), flat.reshape(shape))  # (n, clip)


def _bytes_tensor(name: str, shape: list[int], elements: list[bytes], count: int) -> Tensor:
    if len(elements) != count:
        raise BadTensor(
            f"input {name!r}: shape {list(shape)} needs {count} elements, got {len(elements)}"
        )
    for i, e in enumerate(elements):
        if not e:
            raise BadTensor(f"input {name!r}: element {i} is empty")
    return Tensor(name, "BYTES", tuple(shape), elements)


def _flatten(data: Any) -> list[Any]:
    if not isinstance(data, list):
        return [data]
    return [x for item in data for x in _flatten(item)]


def _element_bytes(x: Any, name: str, b64: bool) -> bytes:
    if isinstance(x, bytes):
        return x
    if not isinstance(x, str):
        raise BadTensor(f"input {name!r}: BYTES data must be strings, got {type(x).__name__}")
    if not b64:
        return x.encode()
    try:
        return base64.b64decode(x, validate=True)
    except binascii.Error:
        raise BadTensor(f"input {name!r}: an element is not valid base64") from None


def split_bytes(raw: bytes, name: str = "") -> list[bytes]:
    """BYTES binary data -> its elements (each a 4-byte little-endian length, then the bytes)."""
    elements, at = [], 0
    while at < len(raw):
        if at + 4 > len(raw):
            raise BadTensor(f"input {name!r}: BYTES data ends inside a length prefix")
        (n,) = _LENGTH.unpack_from(raw, at)
        if at + 4 + n > len(raw):
            raise BadTensor(f"input {name!r}: a BYTES element claims {n} bytes past the end")
        elements.append(raw[at + 4 : at + 4 + n])
        at += 4 + n
    return elements


def join_bytes(elements: list[bytes]) -> bytes:
    return b"".join(_LENGTH.pack(len(e)) + e for e in elements)


def parse_outputs(items: Any) -> tuple[RequestedOutput, ...]:
    """REST's `outputs`: [{"name", "parameters": {"classification": k, "binary_data": b}}]."""
    if items is None:
        return ()
    if not isinstance(items, list):
        raise BadTensor("`outputs` must be a list")
    outputs = []
    for item in items:
        if not isinstance(item, dict) or not isinstance(item.get("name"), str):
            raise BadTensor("each of `outputs` must be an object with a `name`")
        params = _params(item, f"output {item['name']!r}")
        binary = params.get("binary_data")
        if binary is not None and not isinstance(binary, bool):
            raise BadTensor(f"output {item['name']!r}: binary_data must be true or false")
        outputs.append(requested_output(item["name"], params.get("classification", 0), binary))
    return tuple(outputs)


def requested_output(name: str, classification: Any = 0, binary: bool | None = None):
    if name not in OUTPUTS:
        raise BadTensor(f"unknown output {name!r}: this model has {', '.join(OUTPUTS)}")
    if isinstance(classification, bool) or not isinstance(classification, int):
        raise BadTensor(f"output {name!r}: classification must be an integer")
    if classification < 0:
        raise BadTensor(f"output {name!r}: classification must be >= 0")
    return RequestedOutput(name, classification, binary)


def _params(doc: dict, what: str) -> dict[str, Any]:
    params = doc.get("parameters") or {}
    if not isinstance(params, dict):
        raise BadTensor(f"{what}: parameters must be an object")
    return params


# --- REST requests ---------------------------------------------------------------------------


def parse_rest(body: bytes, header_length: str | None, meta: ArtifactMetadata) -> InferRequest:
    """A REST infer body: JSON, or (with Inference-Header-Content-Length) a JSON header
    followed by the inputs' binary data in input order."""
    head, binary = _split_body(body, header_length)
    try:
        doc = json.loads(head)
    except (ValueError, UnicodeDecodeError):
        raise BadTensor("the request is not JSON (binary data needs the header length)") from None
    if not isinstance(doc, dict):
        raise BadTensor("the request must be a JSON object")
    inputs = doc.get("inputs")
    if not isinstance(inputs, list) or len(inputs) != 1 or not isinstance(inputs[0], dict):
        raise BadTensor(
            f"`inputs` must hold exactly one input: {AUDIO_INPUT!r} (BYTES) or "
            f"{WAVEFORM_INPUT!r} (FP32)"
        )
    tensor, used = _rest_input(inputs[0], binary, meta)
    if used != len(binary):
        raise BadTensor(f"{len(binary) - used} bytes of binary data follow the inputs' data")
    params = _params(doc, "the request")
    rid = doc.get("id", "")
    return InferRequest(
        input=tensor,
        outputs=parse_outputs(doc.get("outputs")),
        id=rid if isinstance(rid, str) else str(rid),
        binary_outputs=params.get("binary_data_output") is True,
    )


def _split_body(body: bytes, header_length: str | None) -> tuple[bytes, bytes]:
    if header_length is None:
        return body, b""
    if not header_length.strip().isdigit() or not 0 < int(header_length) <= len(body):
        raise BadTensor(
            f"{HEADER_LENGTH} {header_length!r} must be a length within the body ({len(body)})"
        )
    n = int(header_length)
    return body[:n], body[n:]


def _rest_input(doc: dict, binary: bytes, meta: ArtifactMetadata) -> tuple[Tensor, int]:
    """The input tensor and how many bytes of `binary` it used."""
    name, datatype, shape = doc.get("name"), doc.get("datatype"), doc.get("shape")
    if not isinstance(name, str) or not isinstance(datatype, str) or not isinstance(shape, list):
        raise BadTensor("an input needs `name`, `datatype` and `shape`")
    params = _params(doc, f"input {name!r}")
    size = params.get("binary_data_size")
    if size is None:
        if "data" not in doc:
            raise BadTensor(f"input {name!r} has neither `data` nor binary_data_size")
        b64 = params.get("content_type") == "base64"
        return tensor_from_values(name, datatype, shape, doc["data"], meta, b64), 0
    if isinstance(size, bool) or not isinstance(size, int) or not 0 <= size <= len(binary):
        raise BadTensor(
            f"input {name!r}: binary_data_size {size!r} exceeds the {len(binary)} bytes sent"
        )
    return tensor_from_raw(name, datatype, shape, binary[:size], meta), size


# --- outputs ---------------------------------------------------------------------------------


def output_tensors(
    request: InferRequest, values: dict[str, np.ndarray], labels: list[str]
) -> list[tuple[Tensor, bool]]:
    """The answer's tensors, each with whether REST sends it as binary data. `values` holds
    every output as (n, classes) float32."""
    wanted = request.outputs or tuple(RequestedOutput(n) for n in OUTPUTS)
    out = []
    for o in wanted:
        v = values[o.name]  # (n, classes)
        binary = request.binary_outputs if o.binary is None else o.binary
        if o.classification:
            strings = classification(v, o.classification, labels)
            k = len(strings) // len(v)
            out.append((Tensor(o.name, "BYTES", (len(v), k), strings), binary))
        else:
            out.append((Tensor(o.name, "FP32", v.shape, v.astype(np.float32)), binary))
    return out


def classification(values: np.ndarray, k: int, labels: list[str]) -> list[bytes]:
    """(n, C) -> n x min(k, C) "value:index:label" strings, best first (Triton's format)."""
    k = min(k, values.shape[1])
    rows = []
    for row in values:
        top = np.argsort(-row, kind="stable")[:k]
        rows += [f"{row[i]:f}:{i}:{labels[i]}".encode() for i in top]
    return rows


def raw_bytes(t: Tensor) -> bytes:
    """A tensor as binary data."""
    if t.datatype == "BYTES":
        return join_bytes(t.value)
    return np.ascontiguousarray(t.value, dtype="<f4").tobytes()


def rest_response(
    model_name: str, model_version: str, request_id: str, tensors: list[tuple[Tensor, bool]]
) -> tuple[bytes, int | None]:
    """The REST answer's body, and the JSON header's length when binary data follows it."""
    outputs, blobs = [], []
    for t, binary in tensors:
        entry: dict[str, Any] = {"name": t.name, "datatype": t.datatype, "shape": list(t.shape)}
        if binary:
            blob = raw_bytes(t)
            blobs.append(blob)
            entry["parameters"] = {"binary_data_size": len(blob)}
        elif t.datatype == "BYTES":
            entry["data"] = [e.decode() for e in t.value]
        else:
            entry["data"] = t.value.ravel().tolist()
        outputs.append(entry)
    doc: dict[str, Any] = {"model_name": model_name, "model_version": model_version}
    if request_id:
        doc["id"] = request_id
    doc["outputs"] = outputs
    head = json.dumps(doc, separators=(",", ":")).encode()
    if not blobs:
        return head, None
    return head + b"".join(blobs), len(head)
