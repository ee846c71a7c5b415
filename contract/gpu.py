"""What GPU and TensorRT are here, asked without torch. Used by the builder and the runtime."""

from __future__ import annotations

import shutil
import subprocess
from typing import Any

from .errors import ExportError

# ONNX Runtime execution providers that run on a CUDA GPU (onnxruntime-gpu; take a device_id)
GPU_PROVIDERS = frozenset({"CUDAExecutionProvider", "TensorrtExecutionProvider"})

# TensorRT engine defaults, for `export tensorrt` and its BuildConfig alike
TRT_MIN_BATCH = 1  # smallest batch the engine accepts
TRT_OPT_BATCH = 16  # batch the kernels are tuned for (the service's default max_batch_size)
TRT_MAX_BATCH = 64  # largest batch the engine accepts
TRT_WORKSPACE_MIB = 4096  # scratch memory TensorRT may use while running layers

GPU_HINT = (
    "run it on a CUDA machine with `pip install -e '.[gpu]'`, or inside the GPU image "
    "(docker build -f docker/Dockerfile.gpu .)"
)


def require_tensorrt() -> Any:
    """The `tensorrt` module, or ExportError saying how to get it."""
    try:
        import tensorrt as trt
    except ImportError:
        raise ExportError(f"TensorRT is not installed: {GPU_HINT}") from None
    except Exception as e:  # a wheel without its CUDA libraries fails at import with OSError etc.
        raise ExportError(
            f"TensorRT is installed but does not load ({type(e).__name__}): {GPU_HINT}"
        ) from None
    return trt


def cudart() -> Any | None:
    """cuda-python's runtime bindings (new or old module path), or None."""
    try:
        from cuda.bindings import runtime
    except ImportError:
        try:
            from cuda import cudart as runtime  # cuda-python < 12.6
        except ImportError:
            return None
    return runtime


def gpu_info(device: int = 0) -> dict[str, str] | None:
    """{"gpu_name", "compute_capability"} of CUDA device `device`, or None when there is none."""
    rt = cudart()
    if rt is not None:
        err, count = rt.cudaGetDeviceCount()
        if err != rt.cudaError_t.cudaSuccess or count <= device:
            return None
        err, prop = rt.cudaGetDeviceProperties(device)
        if err != rt.cudaError_t.cudaSuccess:
            return None
        name = prop.name.decode() if isinstance(prop.name, bytes) else str(prop.name)
        return {"gpu_name": name.strip("\x00 "), "compute_capability": f"{prop.major}.{prop.minor}"}
    return _nvidia_smi(device)


def _nvidia_smi(device: int) -> dict[str, str] | None:
    if shutil.which("nvidia-smi") is None:
        return None
    try:
        out = subprocess.run(
            [
                "nvidia-smi",
                f"--id={device}",
                "--query-gpu=name,compute_cap",
                "--format=csv,noheader",
            ],
            capture_output=True,
            text=True,
            timeout=20,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    if "," not in out:
        return None
    name, cap = (s.strip() for s in out.rsplit(",", 1))
    return {"gpu_name": name, "compute_capability": cap}


def require_gpu(device: int = 0) -> dict[str, str]:
    info = gpu_info(device)
    if info is None:
        raise ExportError(
            f"no CUDA GPU visible (device {device}): TensorRT engines are built on the GPU "
            f"that runs them; {GPU_HINT}"
        )
    return info
