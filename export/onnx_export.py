"""Checkpoint -> ONNX: one graph from waveform to logits with the log-mel front-end inside.

Uses torch's default (dynamo / torch.export) exporter: a clean graph with BatchNorm folded into
the convolutions, a named dynamic batch axis, and nothing but standard ops that ONNX Runtime and
TensorRT both run (Pad reflect, Conv, MatMul, Log, ReduceMean, ...).
"""

from __future__ import annotations

import copy
import logging
import warnings
from dataclasses import replace
from pathlib import Path
from typing import Any

import onnx
import torch

from contract.errors import ExportError
from contract.files import sha256_file, writable_path
from contract.metadata import (
    EXPLAIN_KEY,
    EXPLAIN_VARIANT,
    INPUT_NAME,
    OUTPUT_NAME,
    ArtifactMetadata,
    ExplainOutputs,
)
from train.model import AudioClassifier

from .graph import check_fp16_layout

log = logging.getLogger(__name__)
OPSET = 18  # >= 17 for LayerNorm/STFT-era ops; 18 is torch 2.13's default and TensorRT 10 reads it
EXPORT_BATCH = 2  # example batch for tracing: 0 and 1 would be specialised, 2 stays symbolic
VARIANTS = ("fp32", "fp16", "int8", EXPLAIN_VARIANT)


def metadata_from_checkpoint(
    ckpt: dict[str, Any], ckpt_path: str | Path, model_name: str | None = None
) -> ArtifactMetadata:
    """Everything the service needs to know, taken from the self-describing checkpoint."""
    fe = ckpt["frontend_config"]
    sha = sha256_file(ckpt_path)
    data = ckpt.get("data") or {}
    return ArtifactMetadata(
        model_name=model_name or Path(ckpt_path).stem,
        model_version=str(ckpt.get("model_version") or sha[:12]),
        labels=list(ckpt["labels"]),
        sample_rate=int(fe["sample_rate"]),
        clip_samples=int(fe["clip_samples"]),
        frontend=dict(fe),
        model_config=dict(ckpt["model_config"]),
        checkpoint_sha256=sha,
        metrics=_scalars(ckpt.get("metrics") or {}),
        data={
            **_scalars({k: v for k, v in data.items() if k != "val_stems"}),
            "val_clips": len(data.get("val_stems") or []),
        },
        calibration=dict(ckpt.get("calibration") or {}),
        extra={"code_version": str(ckpt.get("code_version", "unknown"))},
    )


def _scalars(d: dict[str, Any]) -> dict[str, Any]:
    """The summary part of a dict: numbers, strings, booleans and short lists of them."""
    out = {}
    for k, v in d.items():
        if isinstance(v, (int, float, str, bool)) or v is None:
            out[k] = v
        elif (
            isinstance(v, (list, tuple))
            and len(v) <= 16
            and all(isinstance(x, (int, float, str)) for x in v)
        ):
            out[k] = list(v)
    return out


def export_onnx(
    model: AudioClassifier, path: str | Path, meta: ArtifactMetadata, variant: str = "fp32"
) -> Path:
    """Write `model` as an ONNX graph waveform (B, clip_samples) f32 -> logits (B, classes) f32.

    variant "fp32": everything FP32. "fp16": the CNN in FP16, the front-end and the graph's
    inputs/outputs FP32 (checked). For "int8" use `quantize.quantize_int8` on the fp32 file.
    """
    if variant not in ("fp32", "fp16"):
        raise ExportError(f"export_onnx makes fp32 or fp16 graphs, not {variant!r}")
    path = writable_path(path)
    model = copy.deepcopy(model).float().eval()
    if variant == "fp16":
        model.cnn.half()  # AudioClassifier casts the normalised log-mel to the CNN's dtype
    proto = trace_to_onnx(model, meta.clip_samples)
    if variant == "fp16" and (problems := check_fp16_layout(proto)):
        raise ExportError("fp16 graph has the wrong precision layout: " + "; ".join(problems))
    write_model(proto, path, replace(meta, variant=variant))
    return path


class ExplainGraph(torch.nn.Module):
    """The classifier, also returning its log-mel, each stage's feature maps and the linear
    layer's weights: everything a class activation map needs, so the service needs no torch."""

    def __init__(self, model: AudioClassifier, stages: tuple[str, ...]) -> None:
        super().__init__()
        self.model, self.stages = model, stages

    def forward(self, waveform: torch.Tensor) -> tuple[torch.Tensor, ...]:
        logits, maps = self.model(waveform, return_features=True)
        fc = self.model.cnn.fc
        return (logits, maps["logmel"], *(maps[s] for s in self.stages), fc.weight, fc.bias)


def export_explain(model: AudioClassifier, path: str | Path, meta: ArtifactMetadata) -> Path:
    """Write the fp32 explain graph; its metadata names each extra output (ExplainOutputs)."""
    path = writable_path(path)
    model = copy.deepcopy(model).float().eval()
    with torch.no_grad():  # stage names come from the model's own feature dict
        _, maps = model(torch.zeros(1, meta.clip_samples), return_features=True)
    outputs = ExplainOutputs(stages=tuple(k for k in maps if k != "logmel"))
    # The linear layer's weights are graph outputs on purpose; the optimiser warns that it
    # cannot deduplicate them.
    logging.getLogger("onnx_ir.passes.common.initializer_deduplication").setLevel(logging.ERROR)
    proto = trace_to_onnx(ExplainGraph(model, outputs.stages), meta.clip_samples, outputs.names())
    extra = {**meta.extra, EXPLAIN_KEY: outputs.to_prop()}
    write_model(proto, path, replace(meta, variant=EXPLAIN_VARIANT, extra=extra))
    return path


def trace_to_onnx(
    model: torch.nn.Module, clip_samples: int, output_names: list[str] | None = None
) -> onnx.ModelProto:
    example = torch.zeros(EXPORT_BATCH, clip_samples)
    example[:, ::97] = 0.1  # not all zeros: keeps log/normalisation away from degenerate values
    batch = torch.export.Dim("batch", min=1)
    # The exporter warns about optional torchvision ops and prints progress: not our business.
    logging.getLogger("torch.onnx").setLevel(logging.ERROR)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(
            model,
            (example,),
            dynamo=True,
            opset_version=OPSET,
            verbose=False,
            input_names=[INPUT_NAME],
            output_names=output_names or [OUTPUT_NAME],
            dynamic_shapes={"waveform": {0: batch}},
        )
    return program.model_proto


def write_model(proto: onnx.ModelProto, path: Path, meta: ArtifactMetadata) -> None:
    """Replace the graph's metadata with `meta` and save it as one self-contained file."""
    del proto.metadata_props[:]
    for key, value in meta.to_props().items():
        proto.metadata_props.add(key=key, value=value)
    proto.doc_string = (
        f"{meta.model_name} ({meta.variant}): {INPUT_NAME} (B, {meta.clip_samples}) float32 at "
        f"{meta.sample_rate} Hz -> {OUTPUT_NAME} (B, {len(meta.labels)}) float32"
    )
    tmp = path.with_name(path.name + ".tmp")
    onnx.save_model(proto, str(tmp))
    tmp.replace(path)  # readers never see a half-written model
