"""Self-describing checkpoints: weights plus everything needed to rebuild and explain them."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path
from typing import Any

import torch

from .frontend import FrontendConfig
from .model import AudioClassifier, ModelConfig

FORMAT = "esc50-serve/checkpoint"
FORMAT_VERSION = 1


class CheckpointError(ValueError):
    """A checkpoint is missing, unreadable or not one of ours."""


def code_version() -> str:
    """The git commit of this code (with '-dirty' when the tree has changes), or 'unknown'."""
    root = Path(__file__).resolve().parent.parent
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=root,
            capture_output=True,
            text=True,
            check=True,
            timeout=5,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=root,
            capture_output=True,
            text=True,
            timeout=5,
        ).stdout.strip()
        return sha + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def save_checkpoint(
    path: str | Path, model: AudioClassifier, labels: list[str], **info: Any
) -> None:
    """Write weights + configs + labels; `info` carries train_config, data, metrics, epoch..."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "model_config": model.cnn.cfg.to_dict(),
        "frontend_config": model.frontend.cfg.to_dict(),
        "labels": list(labels),
        "state_dict": model.state_dict(),
        "code_version": info.pop("code_version", None) or code_version(),
        "saved_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        **info,
    }
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save(state, tmp)
    tmp.replace(path)  # never leave a half-written checkpoint behind


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"no checkpoint at {path}")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises several types for corrupt files
        raise CheckpointError(f"cannot read checkpoint {path}: {type(e).__name__}") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not an {FORMAT} file")
    if ckpt.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"{path} has format version {ckpt.get('format_version')}")
    return ckpt


def model_from_checkpoint(ckpt: dict[str, Any]) -> AudioClassifier:
    """Rebuild the classifier in FP32 eval mode, whatever dtype the weights were stored in."""
    model = AudioClassifier(
        ModelConfig.from_dict(ckpt["model_config"]),
        FrontendConfig.from_dict(ckpt["frontend_config"]),
    )
    state = {k: v.float() if v.is_floating_point() else v for k, v in ckpt["state_dict"].items()}
    model.load_state_dict(state)
    return model.eval()


def release_checkpoint(src: str | Path, dst: str | Path) -> None:
    """Strip optimizer state and store weights in FP16 (half the size, same predictions)."""
    ckpt = load_checkpoint(src)
    for key in ("optimizer", "scheduler", "rng"):
        ckpt.pop(key, None)
    ckpt["state_dict"] = {
        k: v.half() if v.is_floating_point() else v for k, v in ckpt["state_dict"].items()
    }
    ckpt["weights_dtype"] = "float16"
    Path(dst).parent.mkdir(parents=True, exist_ok=True)
    torch.save(ckpt, dst)


def attach_calibration(path: str | Path, calibration: dict[str, Any]) -> None:
    """Record a fitted temperature (and how it was fitted) in a checkpoint, in place."""
    ckpt = load_checkpoint(path)
    ckpt["calibration"] = calibration
    tmp = Path(path).with_suffix(Path(path).suffix + ".tmp")
    torch.save(ckpt, tmp)
    tmp.replace(path)
