"""`python -m export verify`: checkpoint, real clips and every artifact -> report."""

from __future__ import annotations

import argparse
import logging
import platform
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

from contract.errors import ExportError, VerificationFailed
from contract.files import sha256_file, writable_path

from .checkpoint import load_model, prefix_of
from .verify import Artifact, Thresholds, artifact_problem, skipped, verify_artifacts, write_reports

log = logging.getLogger("export.verify")


def torch_runner(model):
    import torch

    def run(x: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            return model(torch.from_numpy(np.ascontiguousarray(x, np.float32))).numpy()

    return run


def find_artifacts(prefix: str, variants: list[str], ckpt_sha: str) -> tuple[list[Artifact], dict]:
    """Artifacts present for `prefix`, and a `skipped` entry for each one that is not."""
    found, skips = [], {}
    for v in variants:
        name, path = (
            ("tensorrt_fp16", Path(f"{prefix}.fp16.plan"))
            if v == "tensorrt"
            else (v, Path(f"{prefix}.{v}.onnx"))
        )
        if not path.is_file():
            skips[name] = skipped(path, "artifact not found")
        elif v == "tensorrt" and (why := tensorrt_unavailable()):
            skips[name] = skipped(path, why)
        elif v != "tensorrt" and (why := artifact_problem(Artifact(v, path), ckpt_sha)):
            skips[name] = {**skipped(path, why), "status": "failed", "failures": [why]}
        else:
            found.append(Artifact(name, path))
    return found, skips


def tensorrt_unavailable() -> str | None:
    from contract.gpu import gpu_info, require_tensorrt

    try:
        require_tensorrt()
    except ExportError as e:
        return str(e)
    return None if gpu_info() else "no CUDA GPU visible"


def open_runner(art: Artifact):
    if art.variant == "tensorrt_fp16":
        from contract.tensorrt_runtime import TrtRunner

        return TrtRunner(art.path)
    from .verify import ort_runner

    return ort_runner(art.path)


def run_verify(args: argparse.Namespace) -> dict[str, Any]:
    """Verify and write the report; VerificationFailed (after writing it) when a variant fails."""
    from train.data import load_waveforms

    from .clips import verification_clips

    ckpt, model = load_model(args.checkpoint)
    prefix = args.artifacts or str(prefix_of(args.checkpoint))
    out = Path(args.out or f"{prefix}.verify")
    json_path, md_path = (
        writable_path(out.with_name(out.name + ".json")),
        writable_path(out.with_name(out.name + ".md")),
    )
    ckpt_sha = sha256_file(args.checkpoint)
    artifacts, skips = find_artifacts(prefix, args.variants, ckpt_sha)
    if not artifacts and not any(s["status"] == "failed" for s in skips.values()):
        raise ExportError(f"no artifacts at {prefix}.*: run `make export` first")
    val_stems = (ckpt.get("data") or {}).get("val_stems") or []
    clips, description = verification_clips(args.data_root, val_stems, args.max_clips)
    labels = list(ckpt["labels"])
    targets = np.array([labels.index(c.category) if c.category in labels else -1 for c in clips])
    t = time.perf_counter()
    fe = ckpt["frontend_config"]
    waveforms = load_waveforms(clips, fe["clip_samples"], fe["sample_rate"])
    log.info(
        "verifying %s on %s (decoded in %.1fs)",
        [a.variant for a in artifacts],
        description,
        time.perf_counter() - t,
    )
    th = Thresholds()
    report = verify_artifacts(
        torch_runner(model),
        artifacts,
        waveforms,
        targets,
        th,
        args.batch_size,
        open_runner=open_runner,
    )
    report["variants"].update(skips)
    report["passed"] = bool(artifacts) and all(
        v["passed"] for v in report["variants"].values() if v["status"] != "skipped"
    )
    report.update(
        {
            "model_name": Path(prefix).name,
            "checkpoint": str(args.checkpoint),
            "checkpoint_sha256": ckpt_sha,
            "clips": {
                "count": len(clips),
                "description": description,
                "held_out": bool(val_stems),
                "stems": [c.stem for c in clips],
            },
            "thresholds": asdict(th),
            "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "environment": _environment(),
        }
    )
    write_reports(report, json_path, md_path)
    print(md_path.read_text())
    if not report["passed"]:
        failed = [k for k, v in report["variants"].items() if v["status"] == "failed"]
        raise VerificationFailed(f"verification failed for {', '.join(failed)}: see {md_path}")
    return report


def _environment() -> dict[str, str]:
    import onnxruntime
    import torch

    return {
        "torch": torch.__version__,
        "onnxruntime": onnxruntime.__version__,
        "python": platform.python_version(),
        "machine": platform.machine(),
        "cpu_threads": str(torch.get_num_threads()),
    }
