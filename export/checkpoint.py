"""The checkpoint an export starts from: where its artifacts go, and its model in FP32."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from contract.errors import ExportError


def prefix_of(checkpoint: str | Path) -> Path:
    """models/esc50-resnet34.pt -> models/esc50-resnet34 (artifacts are prefix.<variant>.onnx)."""
    p = Path(checkpoint)
    return p.with_suffix("") if p.suffix == ".pt" else p


def load_model(checkpoint: Path) -> tuple[dict[str, Any], Any]:
    """(checkpoint dict, FP32 eval model); ExportError when it is missing or does not fit."""
    # torch (via train) is imported here, not at module level: `export tensorrt` runs without it
    from train.checkpoint import CheckpointError, load_checkpoint, model_from_checkpoint

    try:
        ckpt = load_checkpoint(checkpoint)
        return ckpt, model_from_checkpoint(ckpt)
    except CheckpointError as e:
        raise ExportError(str(e)) from None
    except (KeyError, TypeError, ValueError, RuntimeError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ExportError(
            f"checkpoint {checkpoint} does not fit this code: {first[:200]}"
        ) from None
