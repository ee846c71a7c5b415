"""Service settings, read from `ESC50_*` environment variables (pydantic-settings)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from contract.audio import MAX_CHANNELS, MAX_SAMPLE_RATE

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_MODEL_DIR = (
    REPO_ROOT / "models"
)  # not the working directory: `make serve` works from anywhere


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="ESC50_", frozen=True, extra="ignore")

    # --- model -------------------------------------------------------------------------------
    model_path: Path | None = None  # the artifact (.onnx / .plan); None = pick from model_dir
    model_dir: Path = DEFAULT_MODEL_DIR  # where the default artifacts live
    model_stem: str = "esc50-resnet34"  # <stem>.int8.onnx / .fp32.onnx / .fp16.plan
    backend: Literal["onnxruntime", "tensorrt"] = "onnxruntime"  # the runtime running the graph
    # ONNX Runtime execution providers in priority order; comma-separated in the env var, e.g.
    # "CUDAExecutionProvider,CPUExecutionProvider" (needs onnxruntime-gpu)
    providers: Annotated[list[str], NoDecode] = ["CPUExecutionProvider"]
    intra_op_threads: int = Field(default=0, ge=0)  # ORT threads inside an op; 0 = per core
    inter_op_threads: int = Field(default=1, ge=1)  # ORT threads across ops (sequential: 1)
    spin: bool = False  # let idle ORT threads busy-wait (lower latency, steals decode CPU)
    device_id: int = Field(default=0, ge=0)  # CUDA device for GPU providers / TensorRT

    # --- batching ----------------------------------------------------------------------------
    max_batch_size: int = Field(default=16, ge=1)  # windows per inference call
    max_wait_ms: float = Field(default=10.0, ge=0)  # a started batch waits this long to fill
    max_queue_size: int = Field(default=64, ge=1)  # requests waiting for inference; more: 503
    # expected queueing time (windows ahead x measured inference time per window) past which
    # new requests get 503 before their upload is read: accepted ones stay far from the deadline
    max_queue_wait_s: float = Field(default=0.5, gt=0)
    request_timeout_s: float = Field(default=30.0, gt=0)  # arrival to answer; past it: 504
    retry_after_s: int = Field(default=1, ge=0)  # Retry-After sent with 503s
    drain_timeout_s: float = Field(default=30.0, ge=0)  # on shutdown, time to finish queued work
    decode_workers: int = Field(default=2, ge=1)  # threads decoding uploads off the event loop

    # --- limits and audio --------------------------------------------------------------------
    max_body_bytes: int = Field(default=20 * 1024 * 1024, ge=1)  # checked while streaming
    max_duration_s: float = Field(default=120.0, gt=0)  # longest audio accepted
    # Caps on what an upload's header may claim; past them: 415 before any decoding (libsndfile
    # accepts absurd values, e.g. 1024 channels). Decoding is block by block, so memory is the
    # model-rate mono output (max_duration_s x its rate x 4 B) whatever these are.
    max_channels: int = Field(default=MAX_CHANNELS, ge=1)  # 22.2 surround is 24 channels
    # Also the decode budget: at most max_duration_s of one channel at this rate decoded
    # (frames x channels; 46 M samples by default), past it: 413 audio_too_large
    max_source_rate: int = Field(default=MAX_SAMPLE_RATE, ge=1)  # Hz; 384 kHz: DXD recorders
    window_hop_s: float = Field(default=2.5, gt=0)  # hop between 5 s windows of longer audio
    default_top_k: int = Field(default=5, ge=1)  # top_k when the query does not say

    # --- explain (/v1/explain and the page) ---------------------------------------------------
    # The fp32 explain artifact; None = beside the served ONNX (<stem>.explain.onnx), else in
    # model_dir. Loaded on the first /v1/explain, never at startup.
    explain_model_path: Path | None = None
    explain_concurrency: int = Field(default=1, ge=1)  # explain inferences running at once
    explain_max_queue: int = Field(default=4, ge=0)  # explain requests waiting; more: 503
    explain_max_duration_s: float = Field(default=30.0, gt=0)  # longest audio explained
    explain_threads: int = Field(default=1, ge=1)  # ORT threads per run; classify keeps the rest

    # --- HTTP ----------------------------------------------------------------------------------
    api_token: SecretStr | None = None  # bearer token for the classify routes; unset = open
    host: str = "127.0.0.1"  # bind address for `python -m service`
    port: int = Field(default=8000, ge=0, le=65535)
    log_level: Literal["critical", "error", "warning", "info", "debug"] = "info"
    warmup: bool = True  # run each batch shape once before /readyz says ready

    @field_validator("providers", mode="before")
    @classmethod
    def _split_providers(cls, v: object) -> object:
        if isinstance(v, str):
            return [p.strip() for p in v.split(",") if p.strip()]
        return v

    @field_validator("log_level", mode="before")
    @classmethod
    def _lower_log_level(cls, v: object) -> object:
        return v.lower() if isinstance(v, str) else v
