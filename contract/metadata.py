"""Artifact metadata: what an exported model says about itself. No torch here.

The ONNX graph carries it in `metadata_props` (string -> string); a TensorRT engine carries it
in a JSON sidecar `<engine>.json`. Structured values are JSON strings. The service reads it
with `read_onnx_metadata` / `read_sidecar` and checks it with `validate_metadata`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

FORMAT_VERSION = "1"
INPUT_NAME = "waveform"  # (B, clip_samples) float32 at sample_rate
OUTPUT_NAME = "logits"  # (B, n_classes) float32

# Front-end settings the serving side can honour: it feeds raw mono waveform resampled to
# `sample_rate` and cut into `clip_samples` windows; the graph does everything else.
SUPPORTED_FRONTEND = {"mel_scale": {"htk"}, "window": {"hann"}, "normalize": {"per_example"}}


BUILTIN_PROPS = frozenset(
    {
        "format_version",
        "model_name",
        "model_version",
        "variant",
        "labels",
        "sample_rate",
        "clip_samples",
        "frontend",
        "model_config",
        "checkpoint_sha256",
        "metrics",
        "data",
        "calibration",
        "input_name",
        "output_name",
    }
)


class MetadataError(ValueError):
    """An artifact's metadata is missing, malformed or asks for something we cannot honour."""


@dataclass(frozen=True)
class ArtifactMetadata:
    model_name: str
    model_version: str
    labels: list[str]
    sample_rate: int
    clip_samples: int
    frontend: dict[str, Any]
    model_config: dict[str, Any] = field(default_factory=dict)
    variant: str = "fp32"  # fp32 | fp16 | int8 | explain (fp32 with extra outputs)
    checkpoint_sha256: str = ""
    metrics: dict[str, Any] = field(default_factory=dict)
    data: dict[str, Any] = field(default_factory=dict)
    # {"temperature": T, ...}: probabilities are softmax(logits / T), T fitted on validation
    # logits when the model was trained; absent means T = 1 (the logits as they are).
    calibration: dict[str, Any] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def temperature(self) -> float:
        return float(self.calibration.get("temperature", 1.0))

    def to_props(self) -> dict[str, str]:
        """Flatten to ONNX `metadata_props` (all strings). An `extra` key may not reuse a
        built-in one: it would silently replace it (as once an int8 note did the calibration)."""
        clash = sorted(set(self.extra) & BUILTIN_PROPS)
        if clash:
            raise MetadataError(f"artifact metadata extra keys clash with built-in ones: {clash}")
        return {
            "format_version": FORMAT_VERSION,
            "model_name": self.model_name,
            "model_version": self.model_version,
            "variant": self.variant,
            "labels": json.dumps(self.labels),
            "sample_rate": str(self.sample_rate),
            "clip_samples": str(self.clip_samples),
            "frontend": json.dumps(self.frontend, sort_keys=True),
            "model_config": json.dumps(self.model_config, sort_keys=True),
            "checkpoint_sha256": self.checkpoint_sha256,
            "metrics": json.dumps(self.metrics, sort_keys=True),
            "data": json.dumps(self.data, sort_keys=True),
            "calibration": json.dumps(self.calibration, sort_keys=True),
            "input_name": INPUT_NAME,
            "output_name": OUTPUT_NAME,
            **{k: v if isinstance(v, str) else json.dumps(v) for k, v in self.extra.items()},
        }

    @classmethod
    def from_props(cls, props: dict[str, str]) -> ArtifactMetadata:
        required = ("labels", "sample_rate", "clip_samples", "frontend")
        missing = [k for k in required if k not in props]
        if missing:
            raise MetadataError(f"artifact metadata lacks {', '.join(missing)}")
        if props.get("format_version", FORMAT_VERSION) != FORMAT_VERSION:
            raise MetadataError(
                f"artifact metadata format {props['format_version']!r}, expected {FORMAT_VERSION}"
            )
        try:
            meta = cls(
                model_name=props.get("model_name", "unknown"),
                model_version=props.get("model_version", "0"),
                labels=json.loads(props["labels"]),
                sample_rate=int(props["sample_rate"]),
                clip_samples=int(props["clip_samples"]),
                frontend=json.loads(props["frontend"]),
                model_config=json.loads(props.get("model_config", "{}")),
                variant=props.get("variant", "fp32"),
                checkpoint_sha256=props.get("checkpoint_sha256", ""),
                metrics=json.loads(props.get("metrics", "{}")),
                data=json.loads(props.get("data", "{}")),
                calibration=json.loads(props.get("calibration", "{}")),
                extra={k: v for k, v in props.items() if k not in BUILTIN_PROPS},
            )
        except (ValueError, TypeError) as e:
            raise MetadataError(f"artifact metadata is malformed: {e}") from None
        validate_metadata(meta)
        return meta

    def to_json(self) -> dict[str, Any]:
        return {k: _maybe_json(v) for k, v in self.to_props().items()}


def _maybe_json(v: str) -> Any:
    try:
        return json.loads(v)
    except ValueError:
        return v


def validate_metadata(meta: ArtifactMetadata) -> None:
    """Raise MetadataError unless the serving side can feed this graph what it expects."""
    if not meta.labels or not all(isinstance(x, str) for x in meta.labels):
        raise MetadataError("artifact metadata has no labels")
    if meta.sample_rate <= 0 or meta.clip_samples <= 0:
        raise MetadataError("artifact sample_rate and clip_samples must be positive")
    if not 0.01 <= meta.temperature <= 100:
        raise MetadataError(f"artifact calibration temperature {meta.temperature} is not sane")
    fe = meta.frontend
    if fe.get("sample_rate", meta.sample_rate) != meta.sample_rate:
        raise MetadataError("front-end sample_rate disagrees with the artifact's sample_rate")
    if fe.get("clip_samples", meta.clip_samples) != meta.clip_samples:
        raise MetadataError("front-end clip_samples disagrees with the artifact's clip_samples")
    for key, allowed in SUPPORTED_FRONTEND.items():
        if key in fe and fe[key] not in allowed:
            raise MetadataError(f"front-end {key}={fe[key]!r} is not supported (have {allowed})")


def read_onnx_metadata(path: str | Path) -> ArtifactMetadata:
    """Read `metadata_props` of an ONNX file without torch (onnx if installed, else ORT)."""
    path = Path(path)
    if not path.is_file():
        raise MetadataError(f"no model file at {path}")
    try:
        import onnx

        model = onnx.load(str(path), load_external_data=False)
        props = {p.key: p.value for p in model.metadata_props}
    except ImportError:
        import onnxruntime as ort

        sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        props = dict(sess.get_modelmeta().custom_metadata_map)
    return ArtifactMetadata.from_props(props)


def sidecar_path(engine_path: str | Path) -> Path:
    return Path(str(engine_path) + ".json")


def write_sidecar(engine_path: str | Path, meta: ArtifactMetadata, engine_info: dict) -> Path:
    out = sidecar_path(engine_path)
    out.write_text(json.dumps({"metadata": meta.to_props(), "engine": engine_info}, indent=2))
    return out


def read_sidecar(engine_path: str | Path) -> tuple[ArtifactMetadata, dict]:
    p = sidecar_path(engine_path)
    if not p.is_file():
        raise MetadataError(f"TensorRT engine {engine_path} has no sidecar {p.name}")
    try:
        doc = json.loads(p.read_text())
        return ArtifactMetadata.from_props(doc["metadata"]), doc["engine"]
    except (ValueError, KeyError) as e:
        raise MetadataError(f"sidecar {p} is malformed: {e}") from None


# --- the explain artifact --------------------------------------------------------------------
# An fp32 graph with the same input and `logits` output as the served ones, plus the tensors a
# page needs to show what the CNN saw and where its evidence lies. Its metadata names them under
# EXPLAIN_KEY, so the service never guesses outputs by position.

EXPLAIN_VARIANT = "explain"
EXPLAIN_KEY = "explain_outputs"


@dataclass(frozen=True)
class ExplainOutputs:
    logmel: str = "logmel"  # (B, 1, n_mels, frames): the normalised log-mel the CNN sees
    stages: tuple[str, ...] = ()  # (B, C, H, W) feature maps, input side first
    classifier_weight: str = "classifier_weight"  # (n_classes, C_last): the linear layer
    classifier_bias: str = "classifier_bias"  # (n_classes,)

    @property
    def cam_maps(self) -> str:
        """The last stage: global average pooling + the linear layer turn it into logits, so a
        class's weighted channel sum over it is the class activation map."""
        return self.stages[-1]

    def names(self) -> list[str]:
        """Every output, `logits` first, in graph order."""
        extra = [self.logmel, *self.stages, self.classifier_weight, self.classifier_bias]
        return [OUTPUT_NAME, *extra]

    def to_prop(self) -> str:
        return json.dumps({**self.__dict__, "stages": list(self.stages)}, sort_keys=True)

    @classmethod
    def from_metadata(cls, meta: ArtifactMetadata) -> ExplainOutputs:
        """Read them from an explain artifact's metadata; MetadataError if it is not one."""
        raw = meta.extra.get(EXPLAIN_KEY)
        if meta.variant != EXPLAIN_VARIANT or raw is None:
            raise MetadataError(f"not an explain artifact: {meta.variant}, no {EXPLAIN_KEY}")
        try:
            doc = json.loads(raw) if isinstance(raw, str) else raw
            out = cls(**{**doc, "stages": tuple(doc["stages"])})
        except (ValueError, TypeError, KeyError) as e:
            raise MetadataError(f"{EXPLAIN_KEY} is malformed: {e}") from None
        if not out.stages or not all(isinstance(s, str) for s in out.names()):
            raise MetadataError(f"{EXPLAIN_KEY} names no feature-map stages")
        return out
