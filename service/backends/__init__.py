"""Inference backends behind one small contract, and the factory that picks one by name.

A backend is loaded with its artifact (and refuses one whose metadata it cannot honour),
then `warmup()` runs the batch shapes, then `predict(waveform) -> logits` is called from
the batcher's single worker thread.
"""

from __future__ import annotations

import importlib
from collections.abc import Sequence
from pathlib import Path
from typing import Protocol

import numpy as np

from contract.metadata import ArtifactMetadata
from service.settings import Settings


class Backend(Protocol):
    name: str  # "onnxruntime" | "tensorrt" | "triton"
    provider: str  # the execution provider / device actually running, e.g. "CPUExecutionProvider"
    metadata: ArtifactMetadata
    max_batch_size: int | None  # the engine's own limit (TensorRT profile); None = any

    def predict(self, waveform: np.ndarray) -> np.ndarray:
        """(B, clip_samples) float32 -> (B, n_classes) float32 logits."""
        ...

    def close(self) -> None: ...


class BackendUnavailable(RuntimeError):
    """The runtime a setting asks for is not installed or cannot run here."""


# setting -> (module, class, pip extra that provides its runtime)
_BACKENDS = {
    "onnxruntime": ("service.backends.ort", "OrtBackend", "pip install .[serve]  (onnxruntime)"),
    "tensorrt": ("service.backends.trt", "TrtBackend", "pip install .[gpu]  (tensorrt, CUDA)"),
    "triton": ("service.backends.triton", "TritonBackend", "pip install .[serve]  (tritonclient)"),
}


def load_backend(settings: Settings, model_path: Path) -> Backend:
    """Import the backend module only when chosen, so CPU installs never need TensorRT."""
    try:
        module_name, class_name, hint = _BACKENDS[settings.backend]
    except KeyError:
        raise BackendUnavailable(f"unknown backend {settings.backend!r}") from None
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise BackendUnavailable(
            f"backend {settings.backend!r} needs {e.name or 'a missing package'}: {hint}"
        ) from e
    backend: Backend = getattr(module, class_name)(model_path, settings)
    return backend


def warmup(backend: Backend, batch_sizes: Sequence[int]) -> None:
    """Run each batch size in `batch_sizes`, in that order, on fixed noise; a model that answers
    non-finite is refused."""
    rng = np.random.default_rng(0)
    clip = backend.metadata.clip_samples
    for b in batch_sizes:
        x = (0.05 * rng.standard_normal((b, clip))).astype(np.float32)  # (B, clip)
        y = backend.predict(x)
        if y.shape != (b, len(backend.metadata.labels)) or not np.isfinite(y).all():
            raise RuntimeError(f"warm-up at batch {b} gave shape {y.shape} or non-finite logits")
