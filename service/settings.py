"""Service settings, read from `ESC50_*` environment variables (pydantic-settings)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from contract.audio import MAX_CHANNELS, MAX_SAMPLE_RATE

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_MODEL_DIR = REPO_ROOT / "models"  # not the working directory: works from anywhere
DEFAULT_REPOSITORY = DEFAULT_MODEL_DIR / "repository"
# Triton's version policies as ESC50_VERSION_POLICY and policy.json spell them
VERSION_POLICY_PATTERN = r"^(latest:[1-9][0-9]*|all|specific:[0-9]+(,[0-9]+)*)$"


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="ESC50_", frozen=True, extra="ignore")

    # --- model repository (service/repository.py) -----------------------------------------
    # <repository>/<model>/<version>/model.onnx, Triton's layout. Where to serve from, first
    # that applies: ESC50_MODEL_PATH (one file, served as version 1 of the model it names);
    # ESC50_MODEL_DIR / ESC50_MODEL_STEM when set and the repository is not (one model from
    # <dir>/<stem>.{int8,fp32}.onnx as `make export` writes them: `make serve`); the repository.
    model_repository: Path | None = DEFAULT_REPOSITORY
    model_path: Path | None = None  # one artifact (.onnx / .plan)
    model_dir: Path = DEFAULT_MODEL_DIR  # where the legacy single-model artifacts live
    model_stem: str = "esc50-resnet34"  # <stem>.int8.onnx / .fp32.onnx / .fp16.plan
    # which models to load at start-up: "*" = every model in the repository; else a
    # comma-separated list (others can be loaded later with the control API)
    startup_models: Annotated[list[str], NoDecode] = ["*"]
    default_model: str | None = None  # answers /v1/classify; None = esc50-resnet34, else first
    # versions kept loaded per model unless <repository>/<model>/policy.json says otherwise:
    # "latest:N", "all", or "specific:1,3" (Triton's version_policy)
    version_policy: str = Field(default="latest:1", pattern=VERSION_POLICY_PATTERN)
    max_loaded_versions: int = Field(default=4, ge=1)  # across all models; a load past it: 409
    repository_poll_s: float = Field(default=0.0, ge=0)  # > 0: load new version folders by polling
    # the control API (/v2/repository/...): off while unset, unless control_open (local use)
    admin_token: SecretStr | None = None
    control_open: bool = False
    # the runtime running the graph; triton: a remote v2 server (service/backends/triton.py)
    backend: Literal["onnxruntime", "tensorrt", "triton"] = "onnxruntime"
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

    # --- streams (WS /v1/stream, service/streams.py; close codes in docs/streams.md) --------
    stream_max_open: int = Field(default=64, ge=0)  # open streams per replica; more: close 1013
    stream_idle_timeout_s: float = Field(default=10.0, gt=0)  # no message this long: close 4408
    # one session's wall-clock length, and the seconds of audio it may send; past either: 4413
    stream_max_session_s: float = Field(default=3600.0, gt=0)
    stream_max_frame_bytes: int = Field(default=1 << 20, ge=64)  # one message; more: close 1009
    stream_queue_windows: int = Field(default=4, ge=1)  # cut windows waiting per stream
    stream_min_hop_s: float = Field(default=0.25, gt=0)  # smallest hop_s a client may ask for
    stream_drain_timeout_s: float = Field(default=5.0, ge=0)  # on shutdown: flush queued windows

    # --- observability (service/observability/, docs/observability.md) ----------------------
    # Traces: the standard OTEL_* variables (OTEL_EXPORTER_OTLP_ENDPOINT: off while unset).
    log_format: Literal["json", "text"] = "text"  # json: one object per line (the images' choice)
    # share of successful requests (status < 400) with an access log line; failures always have one
    access_log_sample: float = Field(default=1.0, ge=0, le=1)

    # --- v2 / gRPC / triton backend (service/v2/, service/backends/triton.py) ---------------
    # the Open Inference Protocol's gRPC endpoint beside the HTTP port (Triton's port); 0 = off
    grpc_port: int = Field(default=8001, ge=0, le=65535)
    triton_url: str = "localhost:8001"  # ESC50_BACKEND=triton: the remote v2 server's gRPC
    # the remote model the batches go to; None = the name of this repository's model folder
    triton_model: str | None = None
    triton_model_version: str = ""  # the remote model's version; "" = its default

    @field_validator(
        "model_repository", "model_path", "admin_token", "api_token", "default_model", mode="before"
    )
    @classmethod
    def _empty_is_none(cls, v: object) -> object:
        # an empty variable is unset: ESC50_MODEL_REPOSITORY= turns the repository off, and
        # compose's `ESC50_ADMIN_TOKEN: ${ESC50_ADMIN_TOKEN:-}` never means "the empty token"
        return None if v == "" else v

    @field_validator("providers", "startup_models", mode="before")
    @classmethod
    def _split_lists(cls, v: object) -> object:
        if isinstance(v, str):
            return [p.strip() for p in v.split(",") if p.strip()]
        return v

    @field_validator("log_level", mode="before")
    @classmethod
    def _lower_log_level(cls, v: object) -> object:
        return v.lower() if isinstance(v, str) else v
