"""Run a TensorRT engine from numpy, without torch: TensorRT 10/11 tensor-address API + cuda-python.

    runner = TrtRunner("models/esc50-resnet34.fp16.plan")   # checks the sidecar first
    logits = runner(waveforms)                              # (B, clip_samples) f32 -> (B, C) f32
    runner.close()

Needs `tensorrt` and `cuda-python` (the `gpu` extra). `check_engine_compat` needs neither, so
the service can explain a mismatched engine on any machine.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from .errors import ExportError
from .gpu import GPU_HINT, cudart, require_gpu, require_tensorrt
from .metadata import INPUT_NAME, OUTPUT_NAME, read_sidecar


class EngineMismatchError(ExportError):
    """The engine was built for another TensorRT version or GPU architecture."""


def check_engine_compat(engine_info: dict, tensorrt_version: str, compute_capability: str) -> None:
    """Raise EngineMismatchError unless this TensorRT and GPU can run the engine."""
    built_trt = engine_info.get("tensorrt_version", "?")
    built_cc = engine_info.get("compute_capability", "?")
    if built_trt != tensorrt_version:
        raise EngineMismatchError(
            f"engine built with TensorRT {built_trt}, this is {tensorrt_version}: rebuild it here "
            "(make export-trt) or serve the ONNX artifact"
        )
    if built_cc != compute_capability:
        raise EngineMismatchError(
            f"engine built for compute capability {built_cc} ({engine_info.get('gpu_name', '?')}), "
            f"this GPU is {compute_capability}: rebuild it on this GPU (make export-trt)"
        )


class TrtRunner:
    """A deserialized engine with device buffers sized for its largest batch, and a stream.

    Not thread-safe: one runner per worker (each has its own execution context and buffers).
    """

    def __init__(self, engine_path: str | Path, device: int = 0):
        self.meta, self.engine_info = read_sidecar(engine_path)
        self.trt = trt = require_tensorrt()
        self.rt = _require_cudart()
        gpu = require_gpu(device)
        check_engine_compat(self.engine_info, trt.__version__, gpu["compute_capability"])
        _check(self.rt, self.rt.cudaSetDevice(device))
        self.engine = trt.Runtime(trt.Logger(trt.Logger.WARNING)).deserialize_cuda_engine(
            Path(engine_path).read_bytes()
        )
        if self.engine is None:
            raise ExportError(f"TensorRT could not deserialize {engine_path}")
        self.context = self.engine.create_execution_context()
        self.min_batch, _, self.max_batch = (
            s[0] for s in self.engine.get_tensor_profile_shape(INPUT_NAME, 0)
        )
        self.n_classes = len(self.meta.labels)
        self.stream = _check(self.rt, self.rt.cudaStreamCreate())
        in_bytes = self.max_batch * self.meta.clip_samples * 4
        out_bytes = self.max_batch * self.n_classes * 4
        self.d_in = _check(self.rt, self.rt.cudaMalloc(in_bytes))
        self.d_out = _check(self.rt, self.rt.cudaMalloc(out_bytes))
        self.context.set_tensor_address(INPUT_NAME, int(self.d_in))
        self.context.set_tensor_address(OUTPUT_NAME, int(self.d_out))

    def __call__(self, waveforms: np.ndarray) -> np.ndarray:
        """(B, clip_samples) float32 -> (B, n_classes) float32; B may exceed max_batch."""
        x = np.ascontiguousarray(waveforms, dtype=np.float32)
        if x.ndim != 2 or x.shape[1] != self.meta.clip_samples:
            raise ValueError(f"expected (B, {self.meta.clip_samples}) waveforms, got {x.shape}")
        parts = [self._run(x[i : i + self.max_batch]) for i in range(0, len(x), self.max_batch)]
        return np.concatenate(parts) if parts else np.zeros((0, self.n_classes), np.float32)

    def _run(self, x: np.ndarray) -> np.ndarray:
        rt, b = self.rt, len(x)
        if b < self.min_batch:  # never the case with the default profile (min 1)
            raise ValueError(f"batch {b} below the engine's minimum {self.min_batch}")
        out = np.empty((b, self.n_classes), np.float32)
        self.context.set_input_shape(INPUT_NAME, x.shape)
        h2d, d2h = (
            rt.cudaMemcpyKind.cudaMemcpyHostToDevice,
            rt.cudaMemcpyKind.cudaMemcpyDeviceToHost,
        )
        _check(rt, rt.cudaMemcpyAsync(self.d_in, x.ctypes.data, x.nbytes, h2d, self.stream))
        if not self.context.execute_async_v3(int(self.stream)):
            raise ExportError("TensorRT execute_async_v3 failed")
        _check(rt, rt.cudaMemcpyAsync(out.ctypes.data, self.d_out, out.nbytes, d2h, self.stream))
        _check(rt, rt.cudaStreamSynchronize(self.stream))
        return out

    def close(self) -> None:
        rt = self.rt
        for ptr in (getattr(self, "d_in", None), getattr(self, "d_out", None)):
            if ptr is not None:
                rt.cudaFree(ptr)
        if getattr(self, "stream", None) is not None:
            rt.cudaStreamDestroy(self.stream)
        self.d_in = self.d_out = self.stream = None

    def __enter__(self) -> TrtRunner:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def _require_cudart() -> Any:
    rt = cudart()
    if rt is None:
        raise ExportError(f"cuda-python is not installed (pip install cuda-python): {GPU_HINT}")
    return rt


def _check(rt: Any, result: Any) -> Any:
    """cuda-python returns (err, *values): raise on error, return the value(s)."""
    err, *values = result if isinstance(result, tuple) else (result,)
    if err != rt.cudaError_t.cudaSuccess:
        raise ExportError(f"CUDA call failed: {rt.cudaGetErrorName(err)[1].decode()}")
    return values[0] if len(values) == 1 else (tuple(values) or None)
