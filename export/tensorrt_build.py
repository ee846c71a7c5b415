"""fp16 ONNX -> TensorRT engine (`.plan`) + JSON sidecar, with the TensorRT 10.12+/11 API.

The network is strongly typed: every tensor's precision comes from the ONNX graph (FP32
front-end, FP16 CNN), so there is no precision flag to set (BuilderFlag.FP16 is gone in 11.x).
An engine only runs on the GPU model and TensorRT version that built it; the sidecar records
both so the service can refuse a mismatched engine with a clear message.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from contract.errors import ExportError
from contract.files import sha256_file, writable_path
from contract.gpu import (
    TRT_MAX_BATCH,
    TRT_MIN_BATCH,
    TRT_OPT_BATCH,
    TRT_WORKSPACE_MIB,
    require_gpu,
    require_tensorrt,
)
from contract.metadata import INPUT_NAME, MetadataError, read_onnx_metadata, write_sidecar

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class BuildConfig:
    min_batch: int = TRT_MIN_BATCH  # smallest batch the engine accepts
    opt_batch: int = TRT_OPT_BATCH  # batch the kernels are tuned for (the service's typical batch)
    max_batch: int = TRT_MAX_BATCH  # largest batch the engine accepts
    workspace_mib: int = TRT_WORKSPACE_MIB  # scratch memory TensorRT may use while running layers
    timing_cache: str | None = (
        None  # tactic timings reused across builds (default: next to the engine)
    )
    device: int = 0  # CUDA device to build on

    def check(self) -> None:
        if not 1 <= self.min_batch <= self.opt_batch <= self.max_batch:
            raise ExportError(
                "need 1 <= min_batch <= opt_batch <= max_batch, got "
                f"{self.min_batch}/{self.opt_batch}/{self.max_batch}"
            )


def default_engine_path(onnx_path: str | Path) -> Path:
    """models/x.fp16.onnx -> models/x.fp16.plan"""
    return Path(onnx_path).with_suffix(".plan")


def build_engine(
    onnx_path: str | Path, engine_path: str | Path | None = None, cfg: BuildConfig = BuildConfig()
) -> Path:
    """Build and save the engine and its sidecar; returns the engine path."""
    cfg.check()
    onnx_path = Path(onnx_path)
    try:
        meta = read_onnx_metadata(onnx_path)
    except MetadataError as e:
        raise ExportError(str(e)) from None
    engine_path = writable_path(engine_path or default_engine_path(onnx_path))
    trt = require_tensorrt()
    gpu = require_gpu(cfg.device)
    cache_path = Path(cfg.timing_cache or engine_path.with_suffix(".timing.cache"))
    started = time.perf_counter()
    plan, profile = _build(trt, onnx_path, meta.clip_samples, cfg, cache_path)
    engine_path.write_bytes(plan)
    info = {
        "tensorrt_version": trt.__version__,
        **gpu,
        "profile": profile,
        "strongly_typed": True,
        "workspace_mib": cfg.workspace_mib,
        "onnx_file": onnx_path.name,
        "onnx_sha256": sha256_file(onnx_path),
        "build_seconds": round(time.perf_counter() - started, 1),
        "built_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "build_config": asdict(cfg),
    }
    write_sidecar(engine_path, meta, info)
    log.info(
        "engine %s (%.1f MB) built in %ss on %s",
        engine_path,
        len(plan) / 1e6,
        info["build_seconds"],
        gpu["gpu_name"],
    )
    return engine_path


def _build(
    trt: Any, onnx_path: Path, clip_samples: int, cfg: BuildConfig, cache_path: Path
) -> tuple[bytes, dict]:
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(_strongly_typed_flag(trt))
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise ExportError(f"TensorRT cannot parse {onnx_path}: {errors}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, cfg.workspace_mib << 20)
    profile = builder.create_optimization_profile()
    shapes = {k: (getattr(cfg, f"{k}_batch"), clip_samples) for k in ("min", "opt", "max")}
    profile.set_shape(INPUT_NAME, shapes["min"], shapes["opt"], shapes["max"])
    config.add_optimization_profile(profile)
    cache = config.create_timing_cache(cache_path.read_bytes() if cache_path.is_file() else b"")
    config.set_timing_cache(
        cache, ignore_mismatch=True
    )  # a cache from another GPU is just not used
    plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise ExportError(
            f"TensorRT failed to build an engine from {onnx_path} (see its log above)"
        )
    cache_path.write_bytes(bytes(config.get_timing_cache().serialize()))
    return bytes(plan), {"input": INPUT_NAME, **{k: list(v) for k, v in shapes.items()}}


def _strongly_typed_flag(trt: Any) -> int:
    """1 << STRONGLY_TYPED: required on 10.12+, accepted (and implied) on 11.x."""
    flag = getattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED", None)
    return 0 if flag is None else 1 << int(flag)
