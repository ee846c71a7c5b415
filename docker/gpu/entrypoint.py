"""GPU container start: build the TensorRT engine unless the cache volume has one for this GPU,
then serve it (`python -m service` with the tensorrt backend).

An engine only runs on the TensorRT version and GPU architecture it was built for, so cached
engines are named by the ONNX file's hash, the compute capability and the TensorRT version:
a new GPU, a new TensorRT or a new model each get their own engine; an existing one is reused.

    ESC50_ONNX_PATH     fp16 ONNX to build from (default /models/esc50-resnet34.fp16.onnx)
    ESC50_ENGINE_CACHE  engine cache folder, a volume (default /cache)
    ESC50_DEVICE_ID     CUDA device (default 0)
    ESC50_MAX_BATCH_SIZE  the service's batch limit; the engine's profile covers it
"""

from __future__ import annotations

import fcntl
import logging
import os
import subprocess
import sys
from pathlib import Path

from contract.files import sha256_file
from contract.gpu import require_gpu, require_tensorrt
from contract.metadata import sidecar_path

log = logging.getLogger("esc50.gpu-entrypoint")


def engine_path(onnx: Path, cache: Path, device: int) -> Path:
    """<cache>/<onnx stem>-<sha12>-sm<cc>-trt<version>.plan"""
    cc = require_gpu(device)["compute_capability"].replace(".", "")
    trt_version = require_tensorrt().__version__
    return cache / f"{onnx.stem}-{sha256_file(onnx)[:12]}-sm{cc}-trt{trt_version}.plan"


def ensure_engine(onnx: Path, engine: Path, device: int, max_batch: int) -> None:
    """Build `engine` unless it and its sidecar (written last) are there; one builder at a time."""
    engine.parent.mkdir(parents=True, exist_ok=True)
    with open(engine.parent / ".build.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # replicas sharing the volume build once, not in a race
        if engine.is_file() and sidecar_path(engine).is_file():
            log.info("cached engine %s", engine.name)
            return
        log.info(
            "no engine for this GPU and TensorRT in %s: building %s", engine.parent, engine.name
        )
        cmd = [
            sys.executable,
            "-m",
            "export",
            "tensorrt",
            "--onnx",
            str(onnx),
            "--out",
            str(engine),
            "--device",
            str(device),
            "--opt-batch",
            str(max_batch),
            "--max-batch",
            str(max(max_batch, 64)),
        ]
        subprocess.run(cmd, check=True)


def main() -> None:
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    onnx = Path(os.environ.get("ESC50_ONNX_PATH", "/models/esc50-resnet34.fp16.onnx"))
    cache = Path(os.environ.get("ESC50_ENGINE_CACHE", "/cache"))
    device = int(os.environ.get("ESC50_DEVICE_ID", "0"))
    if not onnx.is_file():
        sys.exit(f"no fp16 ONNX at {onnx}: run `make export` and mount models/ at /models")
    engine = engine_path(onnx, cache, device)
    ensure_engine(onnx, engine, device, int(os.environ.get("ESC50_MAX_BATCH_SIZE", "16")))
    os.environ.update(ESC50_BACKEND="tensorrt", ESC50_MODEL_PATH=str(engine))
    os.execv(sys.executable, [sys.executable, "-m", "service"])


if __name__ == "__main__":
    main()
