"""ONNX Runtime backend: CPU by default; CUDA / TensorRT EPs with onnxruntime-gpu."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import onnxruntime as ort

from contract.gpu import GPU_PROVIDERS
from contract.metadata import INPUT_NAME, OUTPUT_NAME, ArtifactMetadata, MetadataError
from service.backends import BackendUnavailable
from service.settings import Settings

log = logging.getLogger(__name__)


class OrtBackend:
    name = "onnxruntime"

    def __init__(self, model_path: Path, settings: Settings) -> None:
        if not Path(model_path).is_file():
            raise MetadataError(f"no model file at {model_path}")
        providers = _check_providers(settings.providers)
        self.session = ort.InferenceSession(
            str(model_path),
            sess_options=_session_options(settings),
            providers=[_with_options(p, settings) for p in providers],
        )
        props = dict(self.session.get_modelmeta().custom_metadata_map)
        # Same parsing and validation as contract.metadata.read_onnx_metadata, without reading
        # the file a second time.
        self.metadata = ArtifactMetadata.from_props(props)
        _check_io(self.session, self.metadata)
        self.provider = self.session.get_providers()[0]
        batch_dim = self.session.get_inputs()[0].shape[0]
        self.max_batch_size: int | None = batch_dim if isinstance(batch_dim, int) else None
        log.info("onnxruntime %s: %s on %s", ort.__version__, model_path, self.provider)

    def predict(self, waveform: np.ndarray) -> np.ndarray:
        (logits,) = self.session.run([OUTPUT_NAME], {INPUT_NAME: waveform})
        return np.asarray(logits, dtype=np.float32)

    def close(self) -> None:
        del self.session


def _check_providers(requested: list[str]) -> list[str]:
    available = ort.get_available_providers()
    missing = [p for p in requested if p not in available]
    if missing:
        hint = (
            " (install onnxruntime-gpu: pip install .[gpu])" if GPU_PROVIDERS & set(missing) else ""
        )
        raise BackendUnavailable(
            f"onnxruntime {ort.__version__} lacks {', '.join(missing)}; "
            f"has {', '.join(available)}{hint}"
        )
    return requested or ["CPUExecutionProvider"]


def _with_options(provider: str, settings: Settings) -> str | tuple[str, dict]:
    if provider in GPU_PROVIDERS:
        return provider, {"device_id": settings.device_id}
    return provider


def _session_options(settings: Settings) -> ort.SessionOptions:
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.intra_op_num_threads = settings.intra_op_threads
    so.inter_op_num_threads = settings.inter_op_threads
    # Idle ORT threads spin by default, holding cores that decoding and HTTP could use between
    # batches. Off by default; `make bench` showed no throughput difference either way here.
    so.add_session_config_entry("session.intra_op.allow_spinning", "1" if settings.spin else "0")
    return so


def _check_io(session: ort.InferenceSession, meta: ArtifactMetadata) -> None:
    """Refuse a graph whose inputs/outputs disagree with its own metadata."""
    inputs = {i.name: i for i in session.get_inputs()}
    outputs = {o.name: o for o in session.get_outputs()}
    if INPUT_NAME not in inputs or OUTPUT_NAME not in outputs:
        raise MetadataError(
            f"graph has inputs {list(inputs)} / outputs {list(outputs)}; "
            f"expected {INPUT_NAME!r} -> {OUTPUT_NAME!r}"
        )
    wav, logits = inputs[INPUT_NAME], outputs[OUTPUT_NAME]
    if wav.type != "tensor(float)" or len(wav.shape) != 2:
        raise MetadataError(f"input {INPUT_NAME} is {wav.type} {wav.shape}, expected float (B, T)")
    if isinstance(wav.shape[1], int) and wav.shape[1] != meta.clip_samples:
        raise MetadataError(
            f"input takes {wav.shape[1]} samples, metadata says {meta.clip_samples}"
        )
    n_out = logits.shape[-1] if logits.shape else None
    if isinstance(n_out, int) and n_out != len(meta.labels):
        raise MetadataError(
            f"graph outputs {n_out} classes, metadata has {len(meta.labels)} labels"
        )
