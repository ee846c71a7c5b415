"""TensorRT backend: the `.plan` from `make export-trt`, run by contract.tensorrt_runtime
(no torch).

An engine only runs on the TensorRT version and GPU architecture it was built for; the runner
checks the sidecar `<engine>.json` against this machine before deserialising, and a mismatch
is refused at startup with the reason. tensorrt and cuda-python are imported only when this
backend is chosen (the `gpu` extra).
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from contract.errors import ExportError
from contract.tensorrt_runtime import EngineMismatchError, TrtRunner
from service.backends import BackendUnavailable
from service.settings import Settings

log = logging.getLogger(__name__)


class TrtBackend:
    name = "tensorrt"

    def __init__(self, model_path: Path, settings: Settings) -> None:
        try:
            self.runner = TrtRunner(model_path, device=settings.device_id)
        except EngineMismatchError as e:
            raise BackendUnavailable(
                f"refusing TensorRT engine {Path(model_path).name}: {e}"
            ) from None
        except (
            ExportError
        ) as e:  # no tensorrt / cuda-python / GPU: the message says how to get them
            raise BackendUnavailable(f"tensorrt backend unavailable: {e}") from None
        self.metadata = self.runner.meta
        self.max_batch_size: int | None = int(self.runner.max_batch)
        gpu = self.runner.engine_info.get("gpu_name", "GPU")
        self.provider = f"TensorRT {self.runner.trt.__version__} on {gpu}:{settings.device_id}"
        log.info("tensorrt: %s, max batch %d", model_path, self.max_batch_size)

    def predict(self, waveform: np.ndarray) -> np.ndarray:
        return self.runner(waveform)

    def close(self) -> None:
        self.runner.close()
