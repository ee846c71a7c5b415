"""Parity of exported artifacts with the PyTorch checkpoint, on the same real clips.

For each artifact: max |Δlogit| and top-1 agreement against PyTorch, accuracy on the labelled
clips, and batch-1 vs batch-N consistency. Thresholds (defaults in `Thresholds`):
fp32 max |Δlogit| <= 1e-3 with 100% agreement; fp16 and the TensorRT engine >= 99% agreement;
int8 within 1 point of fp32's accuracy and >= 97% agreement; every artifact batch-invariant
to `batch_max_abs`.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from contract.metadata import INPUT_NAME, MetadataError, read_onnx_metadata

Runner = Callable[[np.ndarray], np.ndarray]  # (B, clip_samples) f32 -> (B, classes) f32


@dataclass(frozen=True)
class Thresholds:
    fp32_max_abs: float = 1e-3  # max |Δlogit| of the fp32 graph vs PyTorch
    fp32_agreement: float = 1.0  # top-1 agreement of the fp32 graph with PyTorch
    fp16_agreement: float = 0.99  # top-1 agreement of the fp16 graph / TensorRT engine
    int8_accuracy_drop: float = 0.01  # int8 accuracy may trail fp32 accuracy by this much
    int8_agreement: float = 0.97  # top-1 agreement of the int8 graph with PyTorch
    batch_max_abs: float = 1e-3  # |Δlogit| between batch-1 and batch-N runs (fp16: x10)


@dataclass
class Artifact:
    variant: str  # fp32 | fp16 | int8 | tensorrt_fp16
    path: Path
    sha256: str = ""  # of the checkpoint it claims to come from


def top1(logits: np.ndarray) -> np.ndarray:
    return logits.argmax(axis=1)


def accuracy(logits: np.ndarray, targets: np.ndarray) -> float | None:
    """Top-1 accuracy over clips with a label (target >= 0); None when none has one."""
    known = targets >= 0
    return float((top1(logits)[known] == targets[known]).mean()) if known.any() else None


def run_batched(run: Runner, x: np.ndarray, batch_size: int) -> tuple[np.ndarray, float]:
    """Logits for all of x in batches, and seconds per clip."""
    started = time.perf_counter()
    out = np.concatenate([run(x[i : i + batch_size]) for i in range(0, len(x), batch_size)])
    return out.astype(np.float32), (time.perf_counter() - started) / max(len(x), 1)


def ort_runner(path: Path) -> Runner:
    import onnxruntime as ort

    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return lambda x: sess.run(None, {INPUT_NAME: np.ascontiguousarray(x, np.float32)})[0]


def compare(
    variant: str,
    logits: np.ndarray,
    batch1: np.ndarray,
    ref: np.ndarray,
    targets: np.ndarray,
    th: Thresholds,
) -> dict[str, Any]:
    """Figures of one artifact against the PyTorch reference `ref` (thresholds not applied yet)."""
    k = len(batch1)
    return {
        "max_abs_logit_diff": float(np.abs(logits - ref).max()),
        "mean_abs_logit_diff": float(np.abs(logits - ref).mean()),
        "top1_agreement": float((top1(logits) == top1(ref)).mean()),
        "accuracy": accuracy(logits, targets),
        "batch1_vs_batchN_max_abs": float(np.abs(batch1 - logits[:k]).max()) if k else 0.0,
        "finite": bool(np.isfinite(logits).all()),
    }


def judge(
    variant: str, fig: dict[str, Any], th: Thresholds, fp32_accuracy: float | None
) -> list[str]:
    """Why `fig` fails its variant's thresholds (empty: it passes)."""
    why = []
    if not fig["finite"]:
        why.append("non-finite logits")
    batch_tol = th.batch_max_abs * (10 if "fp16" in variant else 1)
    if fig["batch1_vs_batchN_max_abs"] > batch_tol:
        why.append(
            f"batch-1 vs batch-N |Δ| {fig['batch1_vs_batchN_max_abs']:.2e} > {batch_tol:.0e}"
        )
    if variant == "fp32":
        if fig["max_abs_logit_diff"] > th.fp32_max_abs:
            why.append(f"max |Δlogit| {fig['max_abs_logit_diff']:.2e} > {th.fp32_max_abs:.0e}")
        if fig["top1_agreement"] < th.fp32_agreement:
            why.append(f"top-1 agreement {fig['top1_agreement']:.2%} < {th.fp32_agreement:.0%}")
    elif "fp16" in variant:
        if fig["top1_agreement"] < th.fp16_agreement:
            why.append(f"top-1 agreement {fig['top1_agreement']:.2%} < {th.fp16_agreement:.0%}")
    elif variant == "int8":
        if fig["top1_agreement"] < th.int8_agreement:
            why.append(f"top-1 agreement {fig['top1_agreement']:.2%} < {th.int8_agreement:.0%}")
        acc = fig["accuracy"]
        if acc is None or fp32_accuracy is None:
            why.append("no labelled clips: int8 accuracy cannot be checked")
        elif fp32_accuracy - acc > th.int8_accuracy_drop:
            why.append(
                f"accuracy {acc:.2%} is {fp32_accuracy - acc:.2%} below fp32 "
                f"({fp32_accuracy:.2%}; allowed {th.int8_accuracy_drop:.1%})"
            )
    return why


def verify_artifacts(
    reference: Runner,
    artifacts: list[Artifact],
    waveforms: np.ndarray,
    targets: np.ndarray,
    th: Thresholds = Thresholds(),
    batch_size: int = 16,
    batch1_clips: int = 8,
    open_runner: Callable[[Artifact], Runner] | None = None,
) -> dict[str, Any]:
    """Run the reference and every artifact on `waveforms`; figures and verdict per variant.

    `targets[i]` is clip i's class index in the checkpoint's labels, or -1 when unknown.
    """
    open_runner = open_runner or (lambda a: ort_runner(a.path))
    ref, ref_sec = run_batched(reference, waveforms, batch_size)
    report: dict[str, Any] = {
        "reference": {"accuracy": accuracy(ref, targets), "seconds_per_clip": ref_sec},
        "variants": {},
    }
    order = sorted(artifacts, key=lambda a: a.variant != "fp32")  # fp32 first: int8 needs it
    for art in order:
        report["variants"][art.variant] = _verify_one(
            art, open_runner, waveforms, ref, targets, th, batch_size, batch1_clips, report
        )
    report["passed"] = all(v["passed"] for v in report["variants"].values()) and bool(artifacts)
    return report


def _verify_one(art, open_runner, waveforms, ref, targets, th, batch_size, batch1_clips, report):
    entry: dict[str, Any] = {"path": str(art.path)}
    try:
        run = open_runner(art)
        logits, sec = run_batched(run, waveforms, batch_size)
        batch1 = np.concatenate(
            [run(waveforms[i : i + 1]) for i in range(min(batch1_clips, len(waveforms)))]
            or [np.zeros((0, ref.shape[1]), np.float32)]
        )
    except Exception as e:  # any load/run failure is a verdict about the artifact, not a crash
        return {
            **entry,
            "passed": False,
            "status": "failed",
            "failures": [f"cannot run: {type(e).__name__}: {str(e)[:200]}"],
        }
    if logits.shape != ref.shape:
        return {
            **entry,
            "passed": False,
            "status": "failed",
            "failures": [f"logits shape {logits.shape}, expected {ref.shape}"],
        }
    fig = compare(art.variant, logits, batch1, ref, targets, th)
    fp32 = report["variants"].get("fp32", {})
    fp32_acc = fp32.get("accuracy") if fp32.get("passed") else report["reference"]["accuracy"]
    why = judge(art.variant, fig, th, fp32_acc)
    return {
        **entry,
        **fig,
        "seconds_per_clip": sec,
        "passed": not why,
        "status": "passed" if not why else "failed",
        "failures": why,
    }


def skipped(path: Path, reason: str) -> dict[str, Any]:
    """A variant that was not checked: never `passed` (the service falls back to fp32)."""
    return {
        "path": str(path),
        "passed": False,
        "status": "skipped",
        "failures": [],
        "reason": reason,
    }


def artifact_problem(art: Artifact, checkpoint_sha256: str) -> str | None:
    """Why an ONNX artifact cannot be verified against this checkpoint (None: it can)."""
    try:
        meta = read_onnx_metadata(art.path)
    except (MetadataError, Exception) as e:
        return f"unreadable metadata: {str(e)[:200]}"
    if meta.checkpoint_sha256 and meta.checkpoint_sha256 != checkpoint_sha256:
        return "exported from a different checkpoint (sha256 mismatch): re-run `make export`"
    return None


# --------------------------------------------------------------------------- report files


def write_reports(report: dict[str, Any], json_path: Path, md_path: Path) -> None:
    json_path.write_text(json.dumps(report, indent=2) + "\n")
    md_path.write_text(markdown(report))


def _fmt(v: Any, kind: str) -> str:
    if v is None:
        return "–"
    return {"pct": f"{v:.1%}", "sci": f"{v:.1e}", "ms": f"{v * 1e3:.0f}"}[kind]


COLUMNS = [
    "artifact",
    "result",
    "max abs Δlogit",
    "top-1 agreement",
    "accuracy",
    "batch-1 vs N abs Δ",
    "ms/clip (CPU)",
]


def _row(name: str, v: dict[str, Any]) -> str:
    result = v["status"] + (f" ({v.get('reason', '')})" if v["status"] == "skipped" else "")
    cells = [
        name,
        result,
        _fmt(v.get("max_abs_logit_diff"), "sci"),
        _fmt(v.get("top1_agreement"), "pct"),
        _fmt(v.get("accuracy"), "pct"),
        _fmt(v.get("batch1_vs_batchN_max_abs"), "sci"),
        _fmt(v.get("seconds_per_clip"), "ms"),
    ]
    return "| " + " | ".join(cells) + " |"


def markdown(report: dict[str, Any]) -> str:
    th = report.get("thresholds", asdict(Thresholds()))
    verdict = "PASSED" if report["passed"] else "FAILED"
    sha = report.get("checkpoint_sha256", "")[:12]
    lines = [
        f"# Export verification: {report.get('model_name', '')} — {verdict}",
        "",
        f"Checkpoint `{report.get('checkpoint', '')}` (sha256 {sha}); clips: "
        f"{report.get('clips', {}).get('description', '')}. "
        f"PyTorch accuracy on them: {_fmt(report['reference']['accuracy'], 'pct')}.",
        "",
        "| " + " | ".join(COLUMNS) + " |",
        "|" + "---|" * len(COLUMNS),
        *(_row(name, v) for name, v in report["variants"].items()),
        "",
    ]
    failures = [f"- {n}: {w}" for n, v in report["variants"].items() for w in v.get("failures", [])]
    if failures:
        lines += ["Failures:", "", *failures, ""]
    lines += [
        f"Thresholds: fp32 max |Δlogit| <= {th['fp32_max_abs']:g} and top-1 agreement >= "
        f"{th['fp32_agreement']:.0%}; fp16 and TensorRT agreement >= {th['fp16_agreement']:.0%}; "
        f"int8 accuracy within {th['int8_accuracy_drop'] * 100:g} points of fp32 and agreement >= "
        f"{th['int8_agreement']:.0%}; batch-1 vs "
        f"batch-N |Δlogit| <= {th['batch_max_abs']:g} (x10 for fp16).",
        "",
    ]
    return "\n".join(lines)
