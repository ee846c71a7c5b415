"""Artifacts -> a Triton Inference Server model repository (`python -m export triton`).

    <out>/<stem>-<variant>/config.pbtxt   inputs/outputs read from the graph, dynamic batching,
                          labels.txt      instance groups, warm-up; the labels from the metadata
                          1/model.onnx    (or 1/model.plan for the TensorRT engine)

One Triton model per servable artifact next to the prefix: the int8 ONNX (CPU) and the fp16
ONNX (GPU) when `<stem>.verify.json` says they passed, the fp32 ONNX (CPU), and the TensorRT
plan (GPU) with its sidecar. Triton takes the fixed-length waveform tensor, not encoded audio:
decoding, resampling and windowing stay in front of it (service/), see README "Scaling".
The config text is written here by hand and parsed back with Triton's own schema in the tests.
"""

from __future__ import annotations

import json
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path

from contract.errors import ExportError
from contract.metadata import ArtifactMetadata, MetadataError, read_onnx_metadata, read_sidecar

log = logging.getLogger("export")

LABELS_FILE = "labels.txt"
VERSION = "1"  # Triton's model version folder

# ONNX TensorProto element types -> Triton data types (the ones these graphs can carry)
ONNX_TO_TRITON = {
    1: "TYPE_FP32",
    10: "TYPE_FP16",
    11: "TYPE_FP64",
    6: "TYPE_INT32",
    7: "TYPE_INT64",
    2: "TYPE_UINT8",
    3: "TYPE_INT8",
    9: "TYPE_BOOL",
}


@dataclass(frozen=True)
class TritonConfig:
    """Batching and placement for every model in the repository. The defaults are the service's
    measured ones (README "Measured figures": batches of 16 windows, 10 ms to fill a batch)."""

    max_batch_size: int = 16  # windows per inference call (ESC50_MAX_BATCH_SIZE)
    preferred_batch_sizes: tuple[int, ...] = (8, 16)  # the dynamic batcher aims for these
    max_queue_delay_us: int = 10_000  # a started batch waits this long to fill (ESC50_MAX_WAIT_MS)
    cpu_instances: int = 1  # ONNX Runtime sessions per CPU model (one owns all its cores)
    gpu_instances: int = 1  # execution contexts per GPU model
    cpu_threads: int = 0  # ONNX Runtime intra-op threads on CPU; 0 = one per core

    def check(self) -> None:
        if self.max_batch_size < 1 or self.max_queue_delay_us < 0:
            raise ExportError("max batch size must be >= 1 and the queue delay >= 0")
        bad = [b for b in self.preferred_batch_sizes if not 1 <= b <= self.max_batch_size]
        if bad:
            raise ExportError(f"preferred batch sizes {bad} are outside 1..{self.max_batch_size}")


@dataclass(frozen=True)
class Tensor:
    name: str
    data_type: str  # Triton TYPE_*
    dims: tuple[int, ...]  # without the batch dimension


@dataclass(frozen=True)
class TritonModel:
    name: str  # folder name = config name
    platform: str  # onnxruntime_onnx | tensorrt_plan
    kind: str  # KIND_CPU | KIND_GPU
    source: Path  # the artifact copied to <name>/1/model.<ext>
    meta: ArtifactMetadata
    inputs: tuple[Tensor, ...]
    outputs: tuple[Tensor, ...]
    max_batch_size: int

    @property
    def filename(self) -> str:
        return "model.plan" if self.platform == "tensorrt_plan" else "model.onnx"


# --- reading the artifacts -------------------------------------------------------------------


def graph_io(onnx_path: Path) -> tuple[tuple[Tensor, ...], tuple[Tensor, ...]]:
    """Inputs and outputs of an ONNX graph as Triton sees them: batch dimension first, dropped."""
    import onnx

    graph = onnx.load(str(onnx_path), load_external_data=False).graph
    initializers = {i.name for i in graph.initializer}

    def tensors(values) -> tuple[Tensor, ...]:
        out = []
        for v in values:
            if v.name in initializers:
                continue
            t = v.type.tensor_type
            dims = [d.dim_value if d.HasField("dim_value") else -1 for d in t.shape.dim]
            if not dims or dims[0] != -1:
                raise ExportError(f"{onnx_path.name}: {v.name} has no dynamic batch dimension")
            if t.elem_type not in ONNX_TO_TRITON:
                raise ExportError(f"{onnx_path.name}: {v.name} has ONNX type {t.elem_type}")
            out.append(Tensor(v.name, ONNX_TO_TRITON[t.elem_type], tuple(dims[1:])))
        return tuple(out)

    return tensors(graph.input), tensors(graph.output)


def passed_variants(prefix: Path) -> set[str]:
    """Variants `make verify` passed, from <stem>.verify.json (absent: none)."""
    path = Path(f"{prefix}.verify.json")
    if not path.is_file():
        return set()
    variants = json.loads(path.read_text()).get("variants", {})
    return {v for v, r in variants.items() if isinstance(r, dict) and r.get("passed")}


def onnx_model(prefix: Path, variant: str, cfg: TritonConfig) -> TritonModel:
    path = Path(f"{prefix}.{variant}.onnx")
    inputs, outputs = graph_io(path)
    kind = "KIND_GPU" if variant == "fp16" else "KIND_CPU"
    return TritonModel(
        f"{prefix.name}-{variant}",
        "onnxruntime_onnx",
        kind,
        path,
        read_onnx_metadata(path),
        inputs,
        outputs,
        cfg.max_batch_size,
    )


def plan_model(prefix: Path, cfg: TritonConfig) -> TritonModel:
    """The TensorRT engine: I/O from the ONNX it was built from (same names, dims and types),
    batch limit from its optimisation profile."""
    plan = Path(f"{prefix}.fp16.plan")
    meta, engine = read_sidecar(plan)
    source_onnx = plan.with_name(engine.get("onnx_file", f"{prefix.name}.fp16.onnx"))
    if not source_onnx.is_file():
        raise ExportError(f"{plan.name} was built from {source_onnx.name}, which is missing")
    inputs, outputs = graph_io(source_onnx)
    profile_max = engine["profile"]["max"][0]
    return TritonModel(
        f"{prefix.name}-tensorrt",
        "tensorrt_plan",
        "KIND_GPU",
        plan,
        meta,
        inputs,
        outputs,
        min(cfg.max_batch_size, profile_max),
    )


def find_models(prefix: Path, cfg: TritonConfig) -> list[TritonModel]:
    passed = passed_variants(prefix)
    models = []
    for variant in ("int8", "fp16", "fp32"):
        path = Path(f"{prefix}.{variant}.onnx")
        if not path.is_file():
            continue
        if variant != "fp32" and variant not in passed:
            log.warning(
                "skipping %s: %s.verify.json does not say it passed", path.name, prefix.name
            )
            continue
        models.append(onnx_model(prefix, variant, cfg))
    if Path(f"{prefix}.fp16.plan").is_file():
        models.append(plan_model(prefix, cfg))
    return models


# --- writing the repository ------------------------------------------------------------------


def _tensor_text(t: Tensor, labels: bool) -> str:
    dims = ", ".join(str(d) for d in t.dims)
    label = f'\n    label_filename: "{LABELS_FILE}"' if labels else ""
    body = f'    name: "{t.name}"\n    data_type: {t.data_type}\n    dims: [ {dims} ]{label}'
    return f"  {{\n{body}\n  }}"


def _warmup_text(m: TritonModel) -> str:
    """Run batch 1 and the largest batch once at load, as the service does before /readyz."""
    entries = []
    for b in sorted({1, m.max_batch_size}):
        inputs = "\n".join(
            f'    inputs {{\n      key: "{t.name}"\n      value {{\n        data_type: '
            f"{t.data_type}\n        dims: [ {', '.join(str(d) for d in t.dims)} ]\n"
            f"        zero_data: true\n      }}\n    }}"
            for t in m.inputs
        )
        entries.append(f'  {{\n    name: "batch-{b}"\n    batch_size: {b}\n{inputs}\n  }}')
    return "model_warmup [\n" + ",\n".join(entries) + "\n]\n"


def config_text(m: TritonModel, cfg: TritonConfig) -> str:
    """config.pbtxt in protobuf text format (Triton's ModelConfig message)."""
    preferred = ", ".join(str(b) for b in cfg.preferred_batch_sizes if b <= m.max_batch_size)
    count = cfg.gpu_instances if m.kind == "KIND_GPU" else cfg.cpu_instances
    inputs = ",\n".join(_tensor_text(t, labels=False) for t in m.inputs)
    outputs = ",\n".join(_tensor_text(t, labels=(i == 0)) for i, t in enumerate(m.outputs))
    text = (
        f"# {m.meta.model_name} {m.meta.model_version} ({m.meta.variant}), written by "
        f"`python -m export triton` from {m.source.name}\n"
        f'name: "{m.name}"\nplatform: "{m.platform}"\nmax_batch_size: {m.max_batch_size}\n'
        f"input [\n{inputs}\n]\noutput [\n{outputs}\n]\n"
        f"dynamic_batching {{\n  preferred_batch_size: [ {preferred} ]\n"
        f"  max_queue_delay_microseconds: {cfg.max_queue_delay_us}\n}}\n"
        f"instance_group [\n  {{\n    count: {count}\n    kind: {m.kind}\n  }}\n]\n"
        "version_policy: { latest: { num_versions: 1 } }\n"
    )
    if m.platform == "onnxruntime_onnx" and m.kind == "KIND_CPU":
        text += (
            'parameters {\n  key: "intra_op_thread_count"\n'
            f'  value: {{ string_value: "{cfg.cpu_threads}" }}\n}}\n'
        )
    return text + _warmup_text(m)


def write_model(m: TritonModel, out_dir: Path, cfg: TritonConfig) -> Path:
    model_dir = out_dir / m.name
    (model_dir / VERSION).mkdir(parents=True, exist_ok=True)
    shutil.copyfile(m.source, model_dir / VERSION / m.filename)
    (model_dir / LABELS_FILE).write_text("\n".join(m.meta.labels) + "\n")
    (model_dir / "config.pbtxt").write_text(config_text(m, cfg))
    return model_dir


def write_repository(prefix: str | Path, out_dir: str | Path, cfg: TritonConfig) -> list[Path]:
    """Write one Triton model per servable artifact at `prefix`; returns the model folders."""
    cfg.check()
    prefix, out_dir = Path(prefix), Path(out_dir)
    try:
        models = find_models(prefix, cfg)
    except MetadataError as e:
        raise ExportError(str(e)) from None
    if not models:
        raise ExportError(f"no servable artifact at {prefix}.*: run `make export` (and verify)")
    return [write_model(m, out_dir, cfg) for m in models]
