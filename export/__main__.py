"""`python -m export {onnx,tensorrt,verify} ...`: checkpoint -> served artifacts, and their check.

Every expected failure (missing or incompatible checkpoint, unknown variant, unwritable output,
no TensorRT/GPU, a failed verification) ends with one line on stderr and a non-zero exit.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

from .errors import ExportError, VerificationFailed

log = logging.getLogger("export")
EXIT_ERROR, EXIT_VERIFY_FAILED = 2, 1  # bad input / artifacts past their thresholds


def _variants(s: str) -> list[str]:
    from .onnx_export import VARIANTS

    chosen = [v.strip() for v in s.split(",") if v.strip()]
    bad = [v for v in chosen if v not in (*VARIANTS, "tensorrt")]
    if bad or not chosen:
        raise argparse.ArgumentTypeError(
            f"unknown variant {', '.join(bad) or s!r} (have fp32, fp16, int8)"
        )
    return chosen


def prefix_of(checkpoint: str | Path) -> Path:
    """models/esc50-resnet34.pt -> models/esc50-resnet34 (artifacts are prefix.<variant>.onnx)."""
    p = Path(checkpoint)
    return p.with_suffix("") if p.suffix == ".pt" else p


def load_model(checkpoint: Path):
    """(checkpoint dict, FP32 eval model); ExportError when it is missing or does not fit."""
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


# --------------------------------------------------------------------------- onnx


def onnx_main(args: argparse.Namespace) -> int:
    from .onnx_export import export_onnx, metadata_from_checkpoint

    ckpt, model = load_model(args.checkpoint)
    meta = metadata_from_checkpoint(
        ckpt, args.checkpoint, args.model_name or prefix_of(args.checkpoint).name
    )
    prefix = Path(args.out_prefix) if args.out_prefix else prefix_of(args.checkpoint)
    if "int8" in args.variants and not args.data_root:
        raise ExportError("the int8 variant is calibrated on real clips: pass --data-root")
    for variant in ("fp32", "fp16"):
        if variant in args.variants:
            t = time.perf_counter()
            path = export_onnx(model, f"{prefix}.{variant}.onnx", meta, variant)
            _report(path, t)
    if "int8" in args.variants:
        _quantize(args, ckpt, model, meta, prefix)
    return 0


def _quantize(args, ckpt, model, meta, prefix: Path) -> None:
    from train.data import load_waveforms

    from .clips import calibration_clips
    from .onnx_export import export_onnx
    from .quantize import quantize_int8

    t = time.perf_counter()
    fp32 = Path(f"{prefix}.fp32.onnx")
    if "fp32" not in args.variants:  # quantise a fresh fp32 graph, never a stale one
        fp32 = export_onnx(model, Path(f"{prefix}.int8-src.fp32.onnx"), meta, "fp32")
    clips = calibration_clips(
        args.data_root, (ckpt.get("data") or {}).get("val_stems") or [], args.calibration_clips
    )
    info = {
        "source": "training clips (checkpoint's val_stems excluded)",
        "classes": len({c.target for c in clips}),
    }
    try:
        path = quantize_int8(
            fp32,
            f"{prefix}.int8.onnx",
            load_waveforms(clips, meta.clip_samples),
            meta,
            args.calibration_method,
            info,
        )
    finally:
        if "fp32" not in args.variants:
            fp32.unlink(missing_ok=True)
    _report(path, t, f"calibrated on {len(clips)} training clips")


def _report(path: Path, started: float, note: str = "") -> None:
    mb = path.stat().st_size / 1e6
    took = time.perf_counter() - started
    print(f"wrote {path} ({mb:.1f} MB, {took:.1f}s)" + (f", {note}" if note else ""))


# --------------------------------------------------------------------------- tensorrt


def tensorrt_main(args: argparse.Namespace) -> int:
    from .tensorrt_build import BuildConfig, build_engine

    if not Path(args.onnx).is_file():
        raise ExportError(f"no ONNX model at {args.onnx}: run `make export` first")
    cfg = BuildConfig(
        args.min_batch,
        args.opt_batch,
        args.max_batch,
        args.workspace_mib,
        args.timing_cache,
        args.device,
    )
    t = time.perf_counter()
    _report(build_engine(args.onnx, args.out, cfg), t)
    return 0


# --------------------------------------------------------------------------- verify


def verify_main(args: argparse.Namespace) -> int:
    from .verify_cli import run_verify

    run_verify(args)  # raises VerificationFailed (exit 1) when a variant fails its thresholds
    return 0


def _expected_errors() -> tuple[type[Exception], ...]:
    """Errors that are the user's to fix: one line each, no traceback."""
    from .metadata import MetadataError

    errors: list[type[Exception]] = [ExportError, MetadataError]
    try:  # the TensorRT command may run where torch (and so train.data) is absent
        from train.data import DataError

        errors.append(DataError)
    except ImportError:
        pass
    return tuple(errors)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m export", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)

    o = sub.add_parser("onnx", help="checkpoint -> ONNX fp32 / fp16 / int8")
    o.add_argument("--checkpoint", type=Path, required=True)
    o.add_argument(
        "--data-root", type=Path, help="ESC-50 folder; int8 calibrates on its training clips"
    )
    o.add_argument(
        "--out-prefix",
        help="artifacts are PREFIX.<variant>.onnx (default: checkpoint path minus .pt)",
    )
    o.add_argument(
        "--variants",
        type=_variants,
        default=["fp32", "fp16", "int8"],
        help="comma-separated: fp32,fp16,int8",
    )
    o.add_argument(
        "--calibration-clips", type=int, default=32, help="training clips for int8 calibration"
    )
    o.add_argument("--calibration-method", default="minmax", help="minmax | percentile")
    o.add_argument("--model-name", help="recorded in the metadata (default: checkpoint file stem)")
    o.set_defaults(func=onnx_main)

    t = sub.add_parser("tensorrt", help="fp16 ONNX -> TensorRT engine + JSON sidecar (GPU)")
    t.add_argument(
        "--onnx", type=Path, required=True, help="the fp16 ONNX (precision comes from the graph)"
    )
    t.add_argument("--out", type=Path, help="engine path (default: ONNX path with .plan)")
    t.add_argument("--min-batch", type=int, default=1)
    t.add_argument("--opt-batch", type=int, default=16)
    t.add_argument("--max-batch", type=int, default=64)
    t.add_argument("--workspace-mib", type=int, default=4096)
    t.add_argument(
        "--timing-cache", help="timing cache file (default: engine path with .timing.cache)"
    )
    t.add_argument("--device", type=int, default=0)
    t.set_defaults(func=tensorrt_main)

    v = sub.add_parser("verify", help="every artifact vs PyTorch on real clips; writes a report")
    v.add_argument("--checkpoint", type=Path, required=True)
    v.add_argument("--data-root", type=Path, required=True)
    v.add_argument("--artifacts", help="artifact prefix (default: checkpoint path minus .pt)")
    v.add_argument("--variants", type=_variants, default=["fp32", "fp16", "int8", "tensorrt"])
    v.add_argument(
        "--max-clips", type=int, default=100, help="clips to verify on (held-out ones first)"
    )
    v.add_argument("--batch-size", type=int, default=16)
    v.add_argument("--out", help="report prefix: OUT.json and OUT.md (default: PREFIX.verify)")
    v.set_defaults(func=verify_main)
    return p


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    log.setLevel(logging.INFO)  # ours at INFO; the exporter's optimiser chatter stays below
    args = parser().parse_args(argv)
    try:
        return args.func(args)
    except VerificationFailed as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_VERIFY_FAILED
    except _expected_errors() as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
