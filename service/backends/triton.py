"""A remote Open Inference Protocol server (Triton, or another replica of this service) as the
backend: each batch of FP32 waveforms goes over gRPC (tritonclient.grpc) to
ESC50_TRITON_URL's model ESC50_TRITON_MODEL, input `waveform` -> output `logits`, the names
the exported graph (and `make export-triton`'s config) uses.

The audio front door stays here (decode, resample, windows, batching, admission, metrics), so
it scales on CPUs while the remote runs the graph on GPUs. What the model means (labels,
calibration, clip length, front-end contract) comes from the local ONNX of the same repository
version: its metadata_props, read without running it. A remote failure raises in `predict`,
which fails exactly that batch (the batcher logs the remote's error).
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import tritonclient.grpc as triton
from tritonclient.utils import InferenceServerException

from contract.metadata import INPUT_NAME, OUTPUT_NAME, MetadataError, read_onnx_metadata
from service.backends import BackendUnavailable
from service.settings import Settings

log = logging.getLogger(__name__)


class TritonBackend:
    name = "triton"

    def __init__(self, model_path: Path, settings: Settings) -> None:
        model_path = Path(model_path)
        if model_path.suffix != ".onnx" or not model_path.is_file():
            raise MetadataError(
                f"the triton backend reads labels and calibration from a local ONNX; "
                f"{model_path} is not one"
            )
        self.metadata = read_onnx_metadata(model_path)
        self.model = settings.triton_model or _repository_model(model_path, self.metadata)
        self.version = settings.triton_model_version
        self.timeout_s = settings.request_timeout_s
        self.url = settings.triton_url
        self.client = triton.InferenceServerClient(self.url)
        try:
            self._check_remote()
            self.max_batch_size: int | None = self._remote_max_batch()
        except BaseException:
            self.client.close()
            raise
        self.provider = f"{self.url}/{self.model}"
        log.info("triton backend: %s model %s on %s", model_path, self.model, self.url)

    def _check_remote(self) -> None:
        """The remote model is ready and takes waveform FP32 [-1, clip] -> logits [-1, C]."""
        try:
            if not self.client.is_model_ready(self.model, self.version):
                raise BackendUnavailable(f"{self.url}: model {self.model!r} is not ready")
            md = self.client.get_model_metadata(self.model, self.version)
        except InferenceServerException as e:
            raise BackendUnavailable(f"{self.url}: {e.message()}") from None
        inputs = {t.name: t for t in md.inputs}
        outputs = {t.name: t for t in md.outputs}
        wav, logits = inputs.get(INPUT_NAME), outputs.get(OUTPUT_NAME)
        if wav is None or logits is None or wav.datatype != "FP32":
            raise MetadataError(
                f"{self.url} model {self.model!r} has inputs {list(inputs)} / outputs "
                f"{list(outputs)}; expected FP32 {INPUT_NAME!r} -> {OUTPUT_NAME!r}"
            )
        if list(wav.shape)[-1] not in (-1, self.metadata.clip_samples):
            raise MetadataError(
                f"remote {INPUT_NAME} takes {list(wav.shape)}, the local metadata says "
                f"{self.metadata.clip_samples} samples"
            )
        if list(logits.shape)[-1] not in (-1, len(self.metadata.labels)):
            raise MetadataError(
                f"remote {OUTPUT_NAME} has {list(logits.shape)}, the local metadata has "
                f"{len(self.metadata.labels)} labels"
            )

    def _remote_max_batch(self) -> int | None:
        """The remote config's max_batch_size (0 or unknown: no limit of its own)."""
        try:
            config = self.client.get_model_config(self.model, self.version).config
        except InferenceServerException:
            return None
        return int(config.max_batch_size) or None

    def predict(self, waveform: np.ndarray) -> np.ndarray:
        """(B, clip) float32 -> (B, C) float32 logits from the remote."""
        x = triton.InferInput(INPUT_NAME, list(waveform.shape), "FP32")
        x.set_data_from_numpy(np.ascontiguousarray(waveform, dtype=np.float32))
        result = self.client.infer(
            self.model,
            [x],
            model_version=self.version,
            outputs=[triton.InferRequestedOutput(OUTPUT_NAME)],
            client_timeout=self.timeout_s,
        )
        logits = result.as_numpy(OUTPUT_NAME)
        if logits is None:
            raise RuntimeError(f"{self.url} answered without {OUTPUT_NAME}")
        return np.asarray(logits, dtype=np.float32)

    def close(self) -> None:
        self.client.close()


def _repository_model(model_path: Path, meta) -> str:
    """<repository>/<model>/<version>/model.onnx names the model; a lone file, its metadata."""
    if model_path.parent.name.isdigit():
        return model_path.parent.parent.name
    return str(meta.model_name)
