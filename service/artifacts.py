"""Which artifact to serve when ESC50_MODEL_PATH is not set."""

from __future__ import annotations

import json
import logging
from pathlib import Path

from contract.gpu import GPU_PROVIDERS
from service.settings import Settings

log = logging.getLogger(__name__)


class ModelNotFound(RuntimeError):
    """No artifact to serve; the message says which make target produces one."""


def verified_variants(verify_json: Path) -> set[str]:
    """Variants `make verify` passed: `<stem>.verify.json` is {"variants": {v: {"passed": ...}}}."""
    try:
        doc = json.loads(verify_json.read_text())
        return {
            v for v, r in doc.get("variants", {}).items() if isinstance(r, dict) and r.get("passed")
        }
    except FileNotFoundError:
        return set()
    except (ValueError, AttributeError) as e:
        log.warning("ignoring unreadable %s: %s", verify_json, e)
        return set()


def resolve_model_path(settings: Settings) -> Path:
    """ESC50_MODEL_PATH if set; else the TensorRT plan, or int8 (if verified) / fp32 ONNX on CPU,
    fp16 (if verified) / fp32 ONNX on GPU execution providers."""
    if settings.model_path is not None:
        if not settings.model_path.is_file():
            raise ModelNotFound(f"ESC50_MODEL_PATH={settings.model_path} is not a file")
        return settings.model_path
    d, stem = settings.model_dir, settings.model_stem
    if settings.backend == "tensorrt":
        plan = d / f"{stem}.fp16.plan"
        if plan.is_file():
            return plan
        raise ModelNotFound(f"no TensorRT engine at {plan}: run `make export-trt` on the GPU host")
    passed = verified_variants(d / f"{stem}.verify.json")
    preferred = "fp16" if GPU_PROVIDERS & set(settings.providers) else "int8"
    for variant in (preferred, "fp32"):
        path = d / f"{stem}.{variant}.onnx"
        if path.is_file() and (variant == "fp32" or variant in passed):
            return path
        if path.is_file():
            log.warning("not serving %s: %s.verify.json does not say it passed", path.name, stem)
    raise ModelNotFound(
        f"no servable model in {d}: need {stem}.fp32.onnx, or {stem}.{preferred}.onnx with "
        f"{stem}.verify.json saying it passed. Run `make export` (then `make verify`), "
        "or set ESC50_MODEL_PATH"
    )
