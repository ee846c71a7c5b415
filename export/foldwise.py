"""The int8 gate on clips the model never heard: every CV fold's model, fp32 vs int8.

`make verify` compares the shipped int8 graph with fp32 on clips the shipped model trained on,
where both score ~100 %: that compares ceilings. Here each fold model of a `python -m train cv`
run is exported to fp32 ONNX and quantised to int8 by the shipped export code, with the int8
calibration clips drawn from that fold's training clips only, and both graphs are scored on that
fold's validation clips. Pooled over folds (every clip scored once), the int8 recipe passes when
it loses at most `max_accuracy_drop` (0.5 points) of fp32's accuracy. Reported beside it: top-1
agreement of int8 with fp32, the largest logit difference, and the fp32 graph against the
PyTorch validation logits the fold run wrote (the export itself must not move anything).
"""

from __future__ import annotations

import json
import logging
import tempfile
import time
from collections.abc import Callable, Collection
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from contract.errors import ExportError, VerificationFailed
from contract.files import writable_path

from .checkpoint import load_model
from .verify import ort_runner, run_batched

log = logging.getLogger("export.foldwise")
Quantize = Callable[..., Path]  # export.quantize.quantize_int8's signature


@dataclass(frozen=True)
class FoldwiseGate:
    max_accuracy_drop: float = 0.005  # pooled int8 accuracy may trail fp32's by this (0.5 points)


def fold_checkpoints(cv_dir: Path, variant: str | None = None) -> tuple[str, list[Path]]:
    """(variant, its fold models in fold order) of a CV run; by default the report's chosen
    variant, or the only one there is."""
    if variant is None:
        report = cv_dir / "cv_report.json"
        names = sorted(p.parent.parent.name for p in cv_dir.glob("*/fold0/final.pt"))
        if report.is_file():
            r = json.loads(report.read_text())
            variant = r.get("chosen") or next(iter(r["variants"]))
        elif len(names) == 1:
            variant = names[0]
        else:
            raise ExportError(f"{cv_dir} holds variants {names}: name one with --variant")
    paths = sorted((cv_dir / variant).glob("fold*/final.pt"), key=lambda p: int(p.parent.name[4:]))
    if not paths:
        raise ExportError(f"no fold models at {cv_dir / variant}/fold*/final.pt")
    return variant, paths


def fold_clips(data_root: Path, data: dict[str, Any], n_calibration: int):
    """(calibration clips: n from the fold's training clips, validation clips) of one fold."""
    from train.data import select
    from train.distill import trained_stems

    from .clips import spread

    clips = select(data_root).clips
    val_stems = set(data.get("val_stems") or [])
    if not val_stems:
        raise ExportError("the fold model names no validation clips: is it a CV fold run?")
    trained = trained_stems(data, [c.stem for c in clips]) - val_stems
    calibration = spread([c for c in clips if c.stem in trained], n_calibration)
    validation = [c for c in clips if c.stem in val_stems]
    if len(validation) != len(val_stems):
        raise ExportError(
            f"{len(val_stems) - len(validation)} of the fold's validation clips are not in "
            f"{data_root}"
        )
    return calibration, validation


def compare_graphs(
    fp32_path: Path, int8_path: Path, waveforms: np.ndarray, targets: np.ndarray, batch: int = 16
) -> dict[str, Any]:
    """Both graphs on the same clips: logits and the per-fold figures."""
    fp32, _ = run_batched(ort_runner(fp32_path), waveforms, batch)
    int8, _ = run_batched(ort_runner(int8_path), waveforms, batch)
    return {"fp32_logits": fp32, "int8_logits": int8, **figures(fp32, int8, targets)}


def figures(fp32: np.ndarray, int8: np.ndarray, targets: np.ndarray) -> dict[str, Any]:
    p32, p8 = fp32.argmax(1), int8.argmax(1)
    return {
        "clips": int(len(targets)),
        "fp32_correct": int((p32 == targets).sum()),
        "int8_correct": int((p8 == targets).sum()),
        "agree": int((p32 == p8).sum()),
        "fp32_accuracy": float((p32 == targets).mean()),
        "int8_accuracy": float((p8 == targets).mean()),
        "top1_agreement": float((p32 == p8).mean()),
        "max_abs_logit_diff": float(np.abs(fp32 - int8).max()),
        "finite": bool(np.isfinite(int8).all()),
    }


def judge(pooled: dict[str, Any], gate: FoldwiseGate) -> list[str]:
    """Why the pooled figures fail the gate (empty: they pass)."""
    why = []
    if not pooled["finite"]:
        why.append("non-finite int8 logits")
    drop = pooled["fp32_accuracy"] - pooled["int8_accuracy"]
    if drop > gate.max_accuracy_drop + 1e-12:
        why.append(
            f"int8 accuracy {pooled['int8_accuracy']:.2%} is {drop * 100:.2f} points below fp32 "
            f"({pooled['fp32_accuracy']:.2%}; allowed {gate.max_accuracy_drop * 100:g})"
        )
    return why


def pool(folds: list[dict[str, Any]]) -> dict[str, Any]:
    n = sum(f["clips"] for f in folds)
    return {
        "clips": n,
        "fp32_accuracy": sum(f["fp32_correct"] for f in folds) / n,
        "int8_accuracy": sum(f["int8_correct"] for f in folds) / n,
        "top1_agreement": sum(f["agree"] for f in folds) / n,
        "max_abs_logit_diff": max(f["max_abs_logit_diff"] for f in folds),
        "finite": all(f["finite"] for f in folds),
    }


def run_fold(
    ckpt_path: Path,
    data_root: Path,
    work: Path,
    calibration_clips: int,
    method: str,
    keep_fp32: Collection[str],
    quantize: Quantize | None = None,
) -> dict[str, Any]:
    """Export, quantise (this fold's training clips) and compare (its validation clips)."""
    from train.data import load_waveforms

    from .onnx_export import export_onnx, metadata_from_checkpoint
    from .quantize import quantize_int8

    ckpt, model = load_model(ckpt_path)
    calibration, validation = fold_clips(data_root, ckpt.get("data") or {}, calibration_clips)
    meta = metadata_from_checkpoint(ckpt, ckpt_path)
    name = ckpt_path.parent.name
    fp32 = export_onnx(model, work / f"{name}.fp32.onnx", meta, "fp32")
    int8 = (quantize or quantize_int8)(
        fp32,
        work / f"{name}.int8.onnx",
        load_waveforms(calibration, meta.clip_samples, meta.sample_rate),
        meta,
        method,
        {"source": f"{len(calibration)} training clips of {name} (none of its validation clips)"},
        keep_fp32=keep_fp32,
    )
    labels = list(ckpt["labels"])
    targets = np.array([labels.index(c.category) for c in validation])
    waves = load_waveforms(validation, meta.clip_samples, meta.sample_rate)
    result = compare_graphs(fp32, int8, waves, targets)
    fig = {k: v for k, v in result.items() if not k.endswith("_logits")}
    fig.update(
        checkpoint=str(ckpt_path),
        calibration_stems=[c.stem for c in calibration],
        fp32_vs_pytorch_max_abs=_vs_pytorch(ckpt_path, validation, result["fp32_logits"]),
    )
    return fig


def _vs_pytorch(ckpt_path: Path, clips, fp32: np.ndarray) -> float | None:
    """Max |Δlogit| of the fp32 graph against the fold run's own validation logits."""
    path = ckpt_path.with_name("val_logits.npz")
    if not path.is_file():
        return None
    z = np.load(path)
    key = "logits_ema" if "logits_ema" in z.files else "logits_raw"
    where = {str(s): i for i, s in enumerate(z["stems"])}
    if any(c.stem not in where for c in clips):
        return None
    return float(np.abs(z[key][[where[c.stem] for c in clips]] - fp32).max())


def run_foldwise(
    cv_dir: Path,
    data_root: Path,
    out: Path,
    variant: str | None = None,
    gate: FoldwiseGate = FoldwiseGate(),
    calibration_clips: int = 32,
    method: str = "percentile",
    keep_fp32: Collection[str] = ("classifier",),
    quantize: Quantize | None = None,
) -> dict[str, Any]:
    """Every fold, pooled, judged; writes OUT.json and OUT.md. VerificationFailed (after
    writing them) when the gate is not met."""
    variant, paths = fold_checkpoints(cv_dir, variant)
    json_path = writable_path(out.with_name(out.name + ".json"))
    md_path = writable_path(out.with_name(out.name + ".md"))
    folds = []
    with tempfile.TemporaryDirectory() as tmp:
        for p in paths:
            t = time.perf_counter()
            folds.append(
                run_fold(p, data_root, Path(tmp), calibration_clips, method, keep_fp32, quantize)
            )
            log.info("%s: %s (%.0fs)", p.parent.name, _summary(folds[-1]), time.perf_counter() - t)
    pooled = pool(folds)
    why = judge(pooled, gate)
    report = {
        "cv_dir": str(cv_dir),
        "variant": variant,
        "passed": not why,
        "failures": why,
        "pooled": pooled,
        "folds": folds,
        "gate": asdict(gate),
        "int8_recipe": {"calibration": method, "clips": calibration_clips, "fp32": list(keep_fp32)},
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    json_path.write_text(json.dumps(report, indent=2) + "\n")
    md_path.write_text(markdown(report))
    if why:
        raise VerificationFailed(f"fold-wise int8 gate failed: {'; '.join(why)} (see {md_path})")
    return report


def check_report(path: Path) -> dict[str, Any]:
    """A written report's verdict again (for `make verify` where the fold models are absent)."""
    if not path.is_file():
        raise ExportError(
            f"no fold-wise int8 report at {path}: run `python -m export foldwise-int8`"
        )
    report = json.loads(path.read_text())
    if not report.get("passed"):
        raise VerificationFailed(f"fold-wise int8 gate failed: {report.get('failures')} ({path})")
    return report


def _summary(f: dict[str, Any]) -> str:
    return (
        f"fp32 {f['fp32_accuracy']:.3f}, int8 {f['int8_accuracy']:.3f}, agreement "
        f"{f['top1_agreement']:.3f}, max |Δlogit| {f['max_abs_logit_diff']:.3f} on {f['clips']}"
    )


def markdown(report: dict[str, Any]) -> str:
    g, p = report["gate"], report["pooled"]
    rows = [*((Path(f["checkpoint"]).parent.name, f) for f in report["folds"]), ("pooled", p)]
    lines = [
        f"# Fold-wise int8 gate: {'PASSED' if report['passed'] else 'FAILED'}",
        "",
        f"CV run `{report['cv_dir']}`, variant `{report['variant']}`. Each fold's model was "
        "exported to fp32 and int8 ONNX (int8 calibrated on "
        f"{report['int8_recipe']['clips']} of that fold's training clips, "
        f"{report['int8_recipe']['calibration']} ranges, FP32 parts: "
        f"{', '.join(report['int8_recipe']['fp32']) or 'none'}) and scored on that fold's "
        "validation clips, which it never trained on.",
        "",
        "| fold | clips | fp32 accuracy | int8 accuracy | top-1 agreement | max abs Δlogit |",
        "|---|---|---|---|---|---|",
        *(
            f"| {name} | {f['clips']} | {f['fp32_accuracy']:.3f} | {f['int8_accuracy']:.3f} | "
            f"{f['top1_agreement']:.3f} | {f['max_abs_logit_diff']:.3f} |"
            for name, f in rows
        ),
        "",
        f"Gate: pooled int8 accuracy at most {g['max_accuracy_drop'] * 100:g} points below fp32.",
    ]
    lines += [f"- {w}" for w in report["failures"]]
    return "\n".join(lines) + "\n"
