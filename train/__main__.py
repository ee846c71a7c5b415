"""`python -m train [options]` trains; `python -m train {cv,compare,download,evaluate,...} ...`."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from dataclasses import fields, replace
from pathlib import Path

from .data import DEFAULT_DATA_ROOT, DataError
from .model import ModelConfig
from .train import TrainConfig, train


def _parse_folds(s: str) -> list[int]:
    return [int(x) for x in s.split(",") if x.strip()]


def parse_train_config(argv: list[str]) -> TrainConfig:
    p = argparse.ArgumentParser(prog="python -m train", description="Train the ESC-50 model.")
    defaults = TrainConfig()
    for f in fields(TrainConfig):
        if f.name in (
            *("model", "folds", "esc10", "resume", "amp", "channels_last"),
            *("teachers", "teachers_dir"),
        ):
            continue
        p.add_argument(
            f"--{f.name.replace('_', '-')}",
            type=type(getattr(defaults, f.name)),
            default=getattr(defaults, f.name),
        )
    p.add_argument("--folds", type=_parse_folds, default=None, help="e.g. 1,2,3,4 (default all)")
    p.add_argument("--esc10", action="store_true", help="use the ESC-10 subset only")
    p.add_argument("--resume", action="store_true", help="continue from OUT_DIR/last.pt")
    p.add_argument(
        "--amp",
        choices=("auto", "bf16", "off"),
        default=defaults.amp,
        help="bf16 autocast of the CNN: auto = on CUDA and on CPUs with AVX-512 BF16 or AMX",
    )
    p.add_argument("--no-amp", dest="amp", action="store_const", const="off", help="--amp off")
    p.add_argument(
        "--teacher",
        dest="teachers",
        action="append",
        default=[],
        help="distil from this checkpoint (repeatable: the mean of their logits teaches)",
    )
    p.add_argument(
        "--teachers-dir",
        dest="teachers_dir",
        action="append",
        default=[],
        help="distil from every final.pt under this folder (repeatable)",
    )
    p.add_argument(
        "--no-channels-last",
        dest="channels_last",
        action="store_false",
        help="NCHW activations on CUDA",
    )
    p.add_argument("--widths", type=_parse_folds, default=None, help="CNN stage widths, e.g. 8,16")
    p.add_argument("--depths", type=_parse_folds, default=None, help="blocks per stage, e.g. 1,1")
    args = vars(p.parse_args(argv))
    widths, depths = args.pop("widths"), args.pop("depths")
    model = ModelConfig()
    if widths or depths:
        model = replace(
            model, widths=tuple(widths or model.widths), depths=tuple(depths or model.depths)
        )
    return TrainConfig(**args, model=model)


def train_main(argv: list[str]) -> int:
    from .distill import TeacherError

    cfg = parse_train_config(argv)
    try:
        train(cfg)
    except (DataError, TeacherError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


def throughput_main(argv: list[str]) -> int:
    """Training clips/s of a config: `python -m train throughput [--steps N] -- TRAIN_ARGS`."""
    from .train import measure_throughput

    i = argv.index("--") if "--" in argv else len(argv)
    p = argparse.ArgumentParser(
        prog="python -m train throughput", description="Measure training throughput (clips/s)."
    )
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--json-out", default=None)
    p.add_argument("--barrier", default=None, help="folder shared by processes timed together")
    p.add_argument("--barrier-count", type=int, default=1, help="how many meet at the barrier")
    args = p.parse_args(argv[:i])

    def ready() -> None:  # wait until every process is warm, so each is timed under full load
        if not args.barrier:
            return
        folder = Path(args.barrier)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / str(os.getpid())).touch()
        deadline = time.time() + 300
        while len(list(folder.iterdir())) < args.barrier_count and time.time() < deadline:
            time.sleep(0.2)

    result = measure_throughput(parse_train_config(argv[i + 1 :]), steps=args.steps, ready=ready)
    print(json.dumps(result))
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(result))
    return 0


def throughput_report_main(argv: list[str]) -> int:
    from .throughput_report import main

    return main(argv)


def cv_main(argv: list[str]) -> int:
    from .cv import main
    from .distill import TeacherError

    try:
        return main(argv)
    except (DataError, TeacherError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


def compare_main(argv: list[str]) -> int:
    from .cv import compare_main

    return compare_main(argv)


def calibrate_main(argv: list[str]) -> int:
    """Store the temperature fitted by `python -m train cv` in a checkpoint."""
    from .checkpoint import attach_calibration

    p = argparse.ArgumentParser(
        prog="python -m train calibrate",
        description="Store a cross-validated temperature in a checkpoint.",
    )
    p.add_argument("checkpoint")
    p.add_argument("--cv-report", required=True, help="cv_report.json of `python -m train cv`")
    p.add_argument("--variant", default=None, help="which variant's temperature (default: chosen)")
    args = p.parse_args(argv)
    report = json.loads(Path(args.cv_report).read_text())
    variant = args.variant or report.get("chosen") or next(iter(report["variants"]))
    cal = report["variants"][variant]["calibration"]
    attach_calibration(
        args.checkpoint,
        {
            "temperature": cal["temperature"],
            "fitted_on": f"pooled out-of-fold validation logits of {report['k']}-fold "
            f"cross-validation ({report['variants'][variant]['clips']} clips)",
            "ece_before": cal["ece_before"],
            "ece_after_cross_fitted": cal["ece_after_cross_fitted"],
        },
    )
    print(json.dumps({"checkpoint": args.checkpoint, "temperature": cal["temperature"]}))
    return 0


def download_main(argv: list[str]) -> int:
    from .download import DEFAULT_URL, DownloadError, download_esc50

    p = argparse.ArgumentParser(
        prog="python -m train download", description="Fetch and verify the official ESC-50 archive."
    )
    p.add_argument("--dest", default="data/esc50", help="where meta/ and audio/ will be")
    p.add_argument("--url", default=DEFAULT_URL)
    p.add_argument("--sha256", default=None, help="expected sha256 of the archive (optional)")
    args = p.parse_args(argv)
    try:
        info = download_esc50(args.dest, args.url, args.sha256)
    except DownloadError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(info, indent=2))
    return 0


def evaluate_main(argv: list[str]) -> int:
    import numpy as np

    from . import data as D
    from .calibration import softmax
    from .checkpoint import CheckpointError, load_checkpoint, model_from_checkpoint
    from .evaluate import classification_metrics, predict, write_report
    from .folder_data import FolderSelection, mean_by_clip, select_source

    p = argparse.ArgumentParser(
        prog="python -m train evaluate",
        description="Evaluate a checkpoint on labelled clips: ESC-50's layout or a labelled "
        "folder (DATA/<label>/... or DATA/labels.csv; a clip longer than 5 s is scored as the "
        "mean of its windows' probabilities, as the service answers).",
    )
    p.add_argument("checkpoint")
    p.add_argument("--data-root", default=D.DEFAULT_DATA_ROOT, help="ESC-50 or a labelled folder")
    p.add_argument("--folds", type=_parse_folds, default=None)
    p.add_argument("--esc10", action="store_true")
    p.add_argument("--out-dir", default="reports")
    p.add_argument("--name", default="evaluation")
    args = p.parse_args(argv)
    try:
        ckpt = load_checkpoint(args.checkpoint)
        sel = select_source(args.data_root, args.folds, args.esc10)
        labels = list(ckpt["labels"])
        folder = isinstance(sel, FolderSelection)  # its labels are names, in its own order
        if folder and (unknown := sorted({c.category for c in sel.clips} - set(labels))):
            raise DataError(f"classes the checkpoint does not know: {', '.join(unknown)}")
    except (CheckpointError, DataError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    model = model_from_checkpoint(ckpt)
    logits = predict(model, D.load_waveforms(sel.clips))
    y = np.array([labels.index(c.category) if folder else c.target for c in sel.clips])
    if folder:  # windows -> clips, as the service answers
        temperature = (ckpt.get("calibration") or {}).get("temperature", 1.0)
        _, probs, y = mean_by_clip([c.stem for c in sel.clips], softmax(logits, temperature), y)
        logits = np.log(np.clip(probs, 1e-12, None))
    metrics = classification_metrics(y, logits.argmax(1), labels)
    paths = write_report(
        args.out_dir,
        args.name,
        metrics,
        labels,
        {"checkpoint": args.checkpoint, "data": args.data_root, **sel.describe()},
    )
    print(
        json.dumps(
            {
                "accuracy": metrics["accuracy"],
                "macro_f1": metrics["macro_f1"],
                "n": metrics["n"],
                **paths,
            },
            indent=2,
        )
    )
    return 0


def release_main(argv: list[str]) -> int:
    from .checkpoint import release_checkpoint

    p = argparse.ArgumentParser(
        prog="python -m train release", description="Strip optimizer state, store FP16 weights."
    )
    p.add_argument("src")
    p.add_argument("dst")
    args = p.parse_args(argv)
    release_checkpoint(args.src, args.dst)
    return 0


def card_main(argv: list[str]) -> int:
    from .card import render

    p = argparse.ArgumentParser(prog="python -m train card", description="Write a model card.")
    p.add_argument("checkpoint")
    p.add_argument(
        "--cv-report",
        action="append",
        required=True,
        help="cv_report.json of the shipped recipe first, then variants compared",
    )
    p.add_argument("--data-root", default=DEFAULT_DATA_ROOT, help="for the clip counts")
    p.add_argument("--notes", default="")
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)
    Path(args.out).write_text(render(args.checkpoint, args.cv_report, args.data_root, args.notes))
    return 0


def finetune_main(argv: list[str]) -> int:
    from .finetune import main

    return main(argv)


def esc10_folder_main(argv: list[str]) -> int:
    """ESC-10 (or all of ESC-50) re-laid out as a labelled folder of symlinks + labels.csv."""
    from .folder_data import esc50_as_folder

    p = argparse.ArgumentParser(
        prog="python -m train esc10-folder",
        description="Lay ESC-10 out as OUT/<label>/<clip> symlinks and OUT/labels.csv "
        "(group = source recording), the layout `python -m train finetune` reads.",
    )
    p.add_argument("out")
    p.add_argument("--data-root", default=DEFAULT_DATA_ROOT)
    p.add_argument("--all", action="store_true", help="all 50 classes, not the ESC-10 subset")
    args = p.parse_args(argv)
    try:
        info = esc50_as_folder(args.data_root, args.out, esc10=not args.all)
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(info, indent=2))
    return 0


COMMANDS = {
    "calibrate": calibrate_main,
    "card": card_main,
    "compare": compare_main,
    "cv": cv_main,
    "esc10-folder": esc10_folder_main,
    "finetune": finetune_main,
    "throughput": throughput_main,
    "throughput-report": throughput_report_main,
    "download": download_main,
    "evaluate": evaluate_main,
    "release": release_main,
}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    if argv and argv[0] in COMMANDS:
        return COMMANDS[argv[0]](argv[1:])
    return train_main(argv)


if __name__ == "__main__":
    sys.exit(main())
