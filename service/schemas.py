"""Response bodies (pydantic), with the examples shown in the OpenAPI schema."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field


class Prediction(BaseModel):
    label: str
    index: int = Field(description="class index in the model's label list")
    probability: float = Field(description="softmax probability, averaged over windows")


class TimelineEntry(BaseModel):
    start_s: float
    end_s: float
    label: str = Field(description="top label of this window")
    index: int
    probability: float


class ModelRef(BaseModel):
    name: str = Field(description="the model's name in the repository")
    version: str = Field(description="the repository version (the version folder's number)")
    variant: str = Field(description="int8, fp32, fp16 (the artifact's precision)")
    sha256: str = Field(description="the artifact's content hash (first 12 hex digits)")


_EXAMPLE: dict[str, Any] = {
    "model": {
        "name": "esc50-resnet34",
        "version": "1",
        "variant": "int8",
        "sha256": "3f9c2a41b7e0",
    },
    "predictions": [
        {"label": "dog", "index": 0, "probability": 0.91},
        {"label": "wind", "index": 16, "probability": 0.03},
    ],
    "duration_s": 7.5,
    "sample_rate": 48000,
    "channels": 2,
    "format": "WAV/PCM_16",
    "windows": 2,
    "timeline": [
        {"start_s": 0.0, "end_s": 5.0, "label": "dog", "index": 0, "probability": 0.95},
        {"start_s": 2.5, "end_s": 7.5, "label": "dog", "index": 0, "probability": 0.87},
    ],
}


class ClassifyResponse(BaseModel):
    model_config = ConfigDict(json_schema_extra={"examples": [_EXAMPLE]}, protected_namespaces=())

    model: ModelRef
    predictions: list[Prediction] = Field(description="top-k, most probable first")
    duration_s: float = Field(description="input duration")
    sample_rate: int = Field(description="input sample rate (resampled to the model's rate)")
    channels: int = Field(description="input channels (downmixed to mono)")
    format: str = Field(description="container/encoding libsndfile recognised")
    windows: int = Field(description="5 s windows scored; probabilities are their mean")
    timeline: list[TimelineEntry] | None = Field(None, description="per window, when windows > 1")


class ModelCard(BaseModel):
    model_config = ConfigDict(protected_namespaces=())

    name: str
    version: str
    variant: str
    sha256: str
    state: str = Field(description="loading, ready, unloading or failed")
    default: bool = Field(description="answers this model's unversioned routes")
    labels: list[str]
    sample_rate: int
    clip_samples: int
    frontend: dict[str, Any]
    backend: str
    provider: str
    max_batch_size: int
    metrics: dict[str, Any] = Field(
        default_factory=dict, description="evaluation recorded at export"
    )
    memory_bytes: int | None = Field(
        default=None, description="resident memory this version added when it loaded (RSS delta)"
    )


class VersionStatus(BaseModel):
    """A version that is not serving (loading, unloading or failed), and why."""

    name: str
    version: str
    state: str
    reason: str = ""


class ModelList(BaseModel):
    default_model: str | None = Field(description="the model /v1/classify and /classify use")
    models: list[ModelCard] = Field(description="every loaded version, ready to answer")
    unavailable: list[VersionStatus] = Field(
        default_factory=list, description="versions loading, unloading or failed (with reason)"
    )


class ErrorDetail(BaseModel):
    code: str
    message: str
    request_id: str | None = Field(default=None, description="the answer's X-Request-ID")


class ErrorResponse(BaseModel):
    error: ErrorDetail


class Status(BaseModel):
    status: str


# --- /v1/explain -------------------------------------------------------------------------------


class EncodedMap(BaseModel):
    """A 2-D float map sent as 8-bit: value = min + (max - min) * byte / 255."""

    shape: list[int] = Field(description="[rows, cols]; row 0 is the lowest frequency")
    min: float
    max: float
    data: str = Field(description="base64 of rows * cols uint8, row-major")


class StageMaps(BaseModel):
    name: str = Field(description="stem, stage1, ... (input side first)")
    channels: int = Field(description="channels of this stage's output")
    mean: EncodedMap = Field(description="the mean over all channels")
    top_channels: list[int] = Field(description="channels in `maps`, highest mean activation first")
    maps: list[EncodedMap]


class WindowExplanation(BaseModel):
    start_s: float
    end_s: float
    cam_label: str = Field(description="the label `cam` explains: this window's top label")
    cam_index: int
    logmel: EncodedMap = Field(
        description="the normalised log-mel the CNN saw, from the graph's own front-end "
        "(n_mels x frames)"
    )
    cam: EncodedMap = Field(
        description="class activation map of `cam_label`: the last stage's channels weighted by "
        "that class's classifier row, on `logmel`'s grid (each last-stage cell at its receptive "
        "field's centre, linear in between): overlay it 1:1"
    )
    stages: list[StageMaps]


class ExplainResponse(BaseModel):
    classification: ClassifyResponse = Field(description="as /v1/classify, by the fp32 graph")
    frame_hop_s: float = Field(description="seconds per log-mel column")
    windows: list[WindowExplanation] = Field(description="one per classification window")
