"""`python -m export {onnx,tensorrt,verify,foldwise-int8,triton} ...`: checked artifacts.

Every expected failure (missing or incompatible checkpoint, unknown variant, unwritable output,
no TensorRT/GPU, a failed verification) ends with one line on stderr and a non-zero exit.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

from contract.errors import ExportError, VerificationFailed
from contract.gpu import TRT_MAX_BATCH, TRT_MIN_BATCH, TRT_OPT_BATCH, TRT_WORKSPACE_MIB

from .checkpoint import load_model, prefix_of

log = logging.getLogger("export")
EXIT_ERROR, EXIT_VERIFY_FAILED = 2, 1  # bad input / artifacts past their thresholds


def _variants(s: str) -> list[str]:
    from .onnx_export import VARIANTS

    chosen = [v.strip() for v in s.split(",") if v.strip()]
    bad = [v for v in chosen if v not in (*VARIANTS, "tensorrt")]
    if bad or not chosen:
        raise argparse.ArgumentTypeError(
            f"unknown variant {', '.join(bad) or s!r} (have {', '.join(VARIANTS)}, tensorrt)"
        )
    return chosen


# --------------------------------------------------------------------------- onnx


def onnx_main(args: argparse.Namespace) -> int:
    from .onnx_export import export_explain, export_onnx, metadata_from_checkpoint

    ckpt, model = load_model(args.checkpoint)
    meta = metadata_from_checkpoint(
        ckpt, args.checkpoint, args.model_name or prefix_of(args.checkpoint).name
    )
    prefix = Path(args.out_prefix) if args.out_prefix else prefix_of(args.checkpoint)
    try:  # `make export` writes into build/, which a fresh clone lacks
        prefix.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ExportError(f"cannot write {prefix}.*: {e.strerror}") from None
    if "int8" in args.variants and not args.data_root:
        raise ExportError("the int8 variant is calibrated on real clips: pass --data-root")
    for variant in ("fp32", "fp16"):
        if variant in args.variants:
            t = time.perf_counter()
            path = export_onnx(model, f"{prefix}.{variant}.onnx", meta, variant)
            _report(path, t)
    if "int8" in args.variants:
        _quantize(args, ckpt, model, meta, prefix)
    if "explain" in args.variants:
        t = time.perf_counter()
        _report(export_explain(model, f"{prefix}.explain.onnx", meta), t, "for /v1/explain")
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
            load_waveforms(clips, meta.clip_samples, meta.sample_rate),
            meta,
            args.calibration_method,
            info,
            keep_fp32=[part for part in args.keep_fp32.split(",") if part],
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


# --------------------------------------------------------------------------- triton


def triton_main(args: argparse.Namespace) -> int:
    from .triton import TritonConfig, write_repository

    cfg = TritonConfig(
        max_batch_size=args.max_batch_size,
        preferred_batch_sizes=tuple(args.preferred_batch_sizes),
        max_queue_delay_us=args.max_queue_delay_us,
        cpu_instances=args.cpu_instances,
        gpu_instances=args.gpu_instances,
        cpu_threads=args.cpu_threads,
    )
    for model_dir in write_repository(args.artifacts, args.out, cfg):
        log.info("wrote %s", model_dir / "config.pbtxt")
    return 0


# --------------------------------------------------------------------------- verify


def verify_main(args: argparse.Namespace) -> int:
    from .verify_cli import run_verify

    run_verify(args)  # raises VerificationFailed (exit 1) when a variant fails its thresholds
    return 0


# --------------------------------------------------------------------------- foldwise-int8


def foldwise_main(args: argparse.Namespace) -> int:
    from .foldwise import FoldwiseGate, check_report, run_foldwise

    if args.check:  # raises VerificationFailed (exit 1) when the report says the gate failed
        print(f"fold-wise int8 gate passed: {check_report(args.check)['pooled']}")
        return 0
    if not (args.cv_dir and args.data_root):
        raise ExportError("pass --cv-dir and --data-root (or --check REPORT.json)")
    out = Path(args.out or args.cv_dir / "foldwise-int8")
    run_foldwise(
        args.cv_dir,
        args.data_root,
        out,
        args.variant,
        FoldwiseGate(args.max_accuracy_drop),
        args.calibration_clips,
        args.calibration_method,
        [part for part in args.keep_fp32.split(",") if part],
    )  # raises VerificationFailed (exit 1) after writing the report when the gate fails
    print(out.with_name(out.name + ".md").read_text())
    return 0


def _expected_errors() -> tuple[type[Exception], ...]:
    """Errors that are the user's to fix: one line each, no traceback."""
    from contract.metadata import MetadataError

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

    o = sub.add_parser("onnx", help="checkpoint -> ONNX fp32 / fp16 / int8 / explain")
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
        default=["fp32", "fp16", "int8", "explain"],
        help="comma-separated: fp32,fp16,int8,explain (fp32 with the maps /v1/explain shows)",
    )
    o.add_argument(
        "--calibration-clips", type=int, default=32, help="training clips for int8 calibration"
    )
    o.add_argument("--calibration-method", default="percentile", help="percentile | minmax")
    o.add_argument(
        "--keep-fp32",
        default="classifier",
        help="int8: comma-separated CNN parts left in FP32 (stem, classifier; '' for none)",
    )
    o.add_argument("--model-name", help="recorded in the metadata (default: checkpoint file stem)")
    o.set_defaults(func=onnx_main)

    t = sub.add_parser("tensorrt", help="fp16 ONNX -> TensorRT engine + JSON sidecar (GPU)")
    t.add_argument(
        "--onnx", type=Path, required=True, help="the fp16 ONNX (precision comes from the graph)"
    )
    t.add_argument("--out", type=Path, help="engine path (default: ONNX path with .plan)")
    t.add_argument("--min-batch", type=int, default=TRT_MIN_BATCH)
    t.add_argument("--opt-batch", type=int, default=TRT_OPT_BATCH)
    t.add_argument("--max-batch", type=int, default=TRT_MAX_BATCH)
    t.add_argument("--workspace-mib", type=int, default=TRT_WORKSPACE_MIB)
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

    fw = sub.add_parser(
        "foldwise-int8",
        help="each CV fold's model: int8 vs fp32 on its own validation clips; the int8 gate",
    )
    fw.add_argument("--cv-dir", type=Path, help="out dir of `python -m train cv`")
    fw.add_argument("--data-root", type=Path, help="the ESC-50 folder the CV run used")
    fw.add_argument("--variant", help="CV variant (default: the report's chosen one)")
    fw.add_argument(
        "--max-accuracy-drop",
        type=float,
        default=0.005,
        help="pooled int8 accuracy may trail fp32 by this much (0.005 = 0.5 points)",
    )
    fw.add_argument("--calibration-clips", type=int, default=32, help="per fold, training clips")
    fw.add_argument("--calibration-method", default="percentile", help="percentile | minmax")
    fw.add_argument(
        "--keep-fp32", default="classifier", help="CNN parts left in FP32 (stem, classifier)"
    )
    fw.add_argument(
        "--out", help="report prefix: OUT.json and OUT.md (default CV_DIR/foldwise-int8)"
    )
    fw.add_argument(
        "--check", type=Path, help="only re-read a written report.json and fail unless it passed"
    )
    fw.set_defaults(func=foldwise_main)

    tr = sub.add_parser("triton", help="artifacts -> Triton Inference Server model repository")
    tr.add_argument(
        "--artifacts",
        type=Path,
        default=Path("models/esc50-resnet34"),
        help="artifact prefix: PREFIX.{int8,fp16,fp32}.onnx, PREFIX.fp16.plan",
    )
    tr.add_argument("--out", type=Path, default=Path("build/triton"), help="repository folder")
    tr.add_argument("--max-batch-size", type=int, default=16, help="windows per inference call")
    tr.add_argument(
        "--preferred-batch-sizes",
        type=lambda s: [int(x) for x in s.split(",")],
        default=[8, 16],
        help="comma-separated, for Triton's dynamic batcher",
    )
    tr.add_argument(
        "--max-queue-delay-us", type=int, default=10_000, help="how long a batch waits to fill"
    )
    tr.add_argument("--cpu-instances", type=int, default=1)
    tr.add_argument("--gpu-instances", type=int, default=1)
    tr.add_argument("--cpu-threads", type=int, default=0, help="ORT intra-op threads; 0 = per core")
    tr.set_defaults(func=triton_main)
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
