"""Fine-tune the shipped model on a folder of labelled clips and publish it as a served version.

`python -m train finetune --data DIR --name NAME` (`make finetune DATA=DIR NAME=NAME`):
1. reads and checks the folder (train.folder_data: every problem listed at once);
2. the estimate: the recipe trained on part of the clips and scored on the rest, whole groups
   on one side (a grouped held-out split by default, `--folds K` for grouped k-fold); each run
   starts from the shipped checkpoint's front-end and CNN with a new classifier head;
3. a temperature fitted on those held-out logits (train.calibration);
4. the final fit on every clip, same schedule;
5. export through the export code: the int8 graph (calibrated on training clips) as
   `model.onnx`, the fp32 explain graph, int8 vs fp32 verification, a model card;
6. publication as `<repository>/<NAME>/<next version>/` (train.publish: staging + rename).

Training is train.train's (setup, train_epoch, finish), with `init_from` and `freeze_stages`:
the recipe's augmentation, EMA, bf16 autocast where the hardware runs it (`--amp auto`, said in
the log when it falls back), on CPU or CUDA.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import os
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from contract.files import sha256_file

from . import data as D
from .calibration import expected_calibration_error, fit_temperature, softmax, wilson_interval
from .checkpoint import CheckpointError, load_checkpoint, model_from_checkpoint
from .evaluate import classification_metrics, confusion_markdown, write_report
from .folder_data import FolderSelection, is_labelled_folder, mean_by_clip, select_folder
from .model import AudioClassifier, ModelConfig
from .train import (
    Run,
    TrainConfig,
    device_name,
    finish,
    prepare_data,
    resolve_device,
    setup,
    train_epoch,
)

log = logging.getLogger("train.finetune")

DEFAULT_BASE = "models/esc50-resnet34.pt"
DEFAULT_REPOSITORY = "models/repository"  # the service's default (Settings.model_repository)


@dataclass(frozen=True)
class FinetuneConfig:
    data: str  # the labelled folder
    name: str  # the model's name in the repository (and in /v1/models/<name>/...)
    repository: str = DEFAULT_REPOSITORY  # where versions are published
    base: str = DEFAULT_BASE  # the checkpoint whose front-end and CNN start every run
    epochs: int = 8  # passes over the training clips, each run (estimate and final)
    # the stem and this many first residual stages stay fixed (0-4). 3: only the last stage and
    # the head learn: no backward pass through the high-resolution stages, where most of a
    # step's time goes on a CPU, and few weights to fit to a few hundred clips
    freeze_stages: int = 3
    folds: int = 0  # 0: grouped held-out split (val_fraction); K >= 2: grouped K-fold
    val_fraction: float = 0.2  # held-out share of the clips (one part of round(1 / it))
    batch_size: int = 16  # windows per step
    lr: float = 1e-3  # peak of the one-cycle schedule (the recipe's 2e-3 is from scratch)
    ema_decay: float = 0.99  # weights average; short schedules need a short memory
    amp: str = "auto"  # auto | bf16 | off: bf16 autocast of the CNN (train.train)
    device: str = "auto"  # auto | cpu | cuda
    threads: int = 0  # torch intra-op threads on CPU (0: torch's default)
    seed: int = 0
    work_dir: str = ""  # runs, reports, the final checkpoint (default runs/finetune/<name>)
    calibration_clips: int = 32  # training windows the int8 graph is calibrated on
    verify_clips: int = 100  # windows int8 is checked against fp32 on
    estimate_only: bool = False  # stop after the estimate (no final fit, export, publication)
    report: str = ""  # also write the summary and the card here (a committed run report)
    train_args: dict[str, Any] = field(default_factory=dict)  # other TrainConfig fields

    @property
    def out(self) -> Path:
        return Path(self.work_dir or f"runs/finetune/{self.name}")


# --------------------------------------------------------------------------- the start


def start_from(model: AudioClassifier, path: str, labels: list[str], freeze_stages: int) -> dict:
    """Load a checkpoint's front-end and CNN into `model`; the classifier head stays new (kept
    only when the labels are the same, in the same order). Then fix the stem and the first
    `freeze_stages` residual stages: no gradients, so no backward pass through them either
    (their BatchNorm statistics still follow the new sounds)."""
    try:
        ckpt = load_checkpoint(path)
    except CheckpointError as e:
        raise D.DataError(str(e)) from None
    if ckpt["frontend_config"] != model.frontend.cfg.to_dict():
        raise D.DataError(f"{path}: its front-end differs from this code's FrontendConfig")
    mine = {k: v for k, v in model.cnn.cfg.to_dict().items() if k != "n_classes"}
    theirs = {k: v for k, v in ckpt["model_config"].items() if k in mine}
    if theirs != mine:
        raise D.DataError(f"{path}: its CNN {theirs} is not this run's {mine}")
    same_head = list(ckpt["labels"]) == list(labels)
    state = {
        k: v.float() if v.is_floating_point() else v
        for k, v in ckpt["state_dict"].items()
        if same_head or not k.startswith("cnn.fc.")
    }
    missing, unexpected = model.load_state_dict(state, strict=False)
    if unexpected or [k for k in missing if not k.startswith("cnn.fc.")]:
        raise D.DataError(f"{path} does not fit: missing {missing}, unexpected {unexpected}")
    n_stages = len(model.cnn.stages)
    if not 0 <= freeze_stages <= n_stages:
        raise D.DataError(f"--freeze-stages must be 0..{n_stages}, not {freeze_stages}")
    frozen = [model.cnn.stem, *model.cnn.stages[:freeze_stages]] if freeze_stages else []
    for part in frozen:
        for p in part.parameters():
            p.requires_grad_(False)
    names = ["stem", *(f"stage{i + 1}" for i in range(freeze_stages))] if freeze_stages else []
    log.info("start from %s: head %s, frozen %s", path, "kept" if same_head else "new", names)
    return {
        "checkpoint": str(path),
        "sha256": sha256_file(path),
        "labels": len(ckpt["labels"]),
        "head": "kept" if same_head else "new",
        "frozen": names,
    }


def heard_by_base(sel: FolderSelection, base: dict) -> int:
    """How many of the folder's files the base model trained on: files that resolve into the
    base's data folder (ESC-10 laid out as a folder is symlinks to it) and were not among its
    held-out clips. Such clips are not new to the fixed stages: the estimate is optimistic."""
    data = base.get("data") or {}
    if not data.get("root"):
        return 0
    # a root may carry a note after the path: "../shared/esc50 (uploaded to the GPU machine...)"
    root = Path(data["root"].split(" (")[0]).resolve()
    held_out = set(data.get("val_stems") or [])
    files = {c.path.resolve() for c in sel.clips}
    return sum(f.is_relative_to(root) and f.stem not in held_out for f in files)


def base_model_config(path: str) -> ModelConfig:
    try:
        return ModelConfig.from_dict(load_checkpoint(path)["model_config"])
    except CheckpointError as e:
        raise D.DataError(str(e)) from None


# --------------------------------------------------------------------------- runs


@dataclass
class Plan:
    """The runs of one fine-tuning job: the estimate's, then the final one."""

    estimate: list[TrainConfig]
    final: TrainConfig | None
    steps: int  # optimiser steps of all runs: the progress bar's total
    kind: str  # how the estimate was made, as the card says it


def plan(cfg: FinetuneConfig, sel: FolderSelection) -> Plan:
    base = TrainConfig(
        data_root=cfg.data,
        epochs=cfg.epochs,
        batch_size=cfg.batch_size,
        lr=cfg.lr,
        ema_decay=cfg.ema_decay,
        amp=cfg.amp,
        device=cfg.device,
        threads=cfg.threads,
        seed=cfg.seed,
        eval_every=0,
        init_from=cfg.base,
        freeze_stages=cfg.freeze_stages,
        model=base_model_config(cfg.base),
        **cfg.train_args,
    )
    if cfg.folds >= 2:
        runs = [
            replace(base, cv_folds=cfg.folds, cv_index=i, out_dir=str(cfg.out / f"fold{i}"))
            for i in range(cfg.folds)
        ]
        source = "the fold column of labels.csv" if sel.fixed_folds else "whole groups"
        kind = f"grouped {cfg.folds}-fold cross-validation (parts from {source})"
    else:
        runs = [replace(base, val_fraction=cfg.val_fraction, out_dir=str(cfg.out / "holdout"))]
        parts = max(2, round(1 / cfg.val_fraction))
        kind = f"grouped held-out split (1 part of {parts}, whole groups, classes spread evenly)"
    final = (
        None if cfg.estimate_only else replace(base, val_fraction=0, out_dir=str(cfg.out / "final"))
    )
    steps = 0
    for r in [*runs, *([final] if final else [])]:
        _, train_clips, val_clips, _ = prepare_data(r)
        if not train_clips or (r is not final and not val_clips):
            raise D.DataError(f"the split left no clips to train or validate on ({r.out_dir})")
        steps += r.epochs * math.ceil(len(train_clips) / r.batch_size)
    return Plan(runs, final, steps, kind)


class Progress:
    """One bar over every step of every run, so its ETA is the whole job's."""

    def __init__(self, total: int) -> None:
        self.bar = None
        if os.environ.get("TRAIN_PROGRESS", "1") == "1":
            from tqdm import tqdm

            self.bar = tqdm(total=total, unit="step", dynamic_ncols=True, mininterval=1.0)

    def stage(self, text: str) -> None:
        if self.bar is not None:
            self.bar.set_description(text)

    def step(self) -> None:
        if self.bar is not None:
            self.bar.update()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


@dataclass
class RunResult:
    out_dir: Path
    final_pt: Path
    train_seconds: float  # in train_epoch, all epochs
    window_steps: int  # windows trained on (epochs x training windows)
    amp: str


@contextlib.contextmanager
def _quiet_epoch_bars():
    """train_epoch's own per-epoch bar off: the job's bar stands for it."""
    old = os.environ.get("TRAIN_PROGRESS")
    os.environ["TRAIN_PROGRESS"] = "0"
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("TRAIN_PROGRESS", None)
        else:
            os.environ["TRAIN_PROGRESS"] = old


def run_one(tc: TrainConfig, progress: Progress, title: str) -> RunResult:
    shutil.rmtree(tc.out_dir, ignore_errors=True)  # a fresh run: no stale logits to pool
    progress.stage(title)
    with _quiet_epoch_bars():
        run: Run = setup(tc)
        run.on_step = progress.step
        seconds = 0.0
        for epoch in range(tc.epochs):
            t = time.perf_counter()
            run.metrics = train_epoch(run, epoch)
            seconds += time.perf_counter() - t
            with open(run.out_dir / "metrics.jsonl", "a") as f:
                f.write(json.dumps(run.metrics) + "\n")
        final = finish(run)
    return RunResult(run.out_dir, final, seconds, tc.epochs * len(run.train_clips), run.info["amp"])


# --------------------------------------------------------------------------- the estimate


T_GRID = (0.05, 20.0)  # fit_temperature's search range


def identifiable_temperature(logits: np.ndarray, y: np.ndarray) -> float:
    """The fitted temperature, or 1 where none is identifiable: when every held-out window is
    classified right with room to spare, the likelihood keeps rising as T falls and the fit
    stops at the grid's edge (0.05: logits x 20, certainty claimed for anything). T = 1 keeps
    the logits as trained instead, and the card says why."""
    t = fit_temperature(logits, y)
    if not T_GRID[0] * 1.1 < t < T_GRID[1] / 1.1:  # the refinement stays within a grid step
        log.warning("temperature fit hit its bound (T = %.3f): not identifiable, T = 1 kept", t)
        return 1.0
    return t


def pooled_estimate(results: list[RunResult], labels: list[str], k: int) -> dict:
    """Held-out windows of every estimate run -> per-clip figures (the mean of a clip's
    windows' probabilities, as the service answers), the temperature and its calibration."""
    parts = [np.load(r.out_dir / "val_logits.npz") for r in results]
    key = "logits_ema" if "logits_ema" in parts[0].files else "logits_raw"
    logits = np.concatenate([p[key] for p in parts])
    y = np.concatenate([p["targets"] for p in parts])
    stems = [str(s) for p in parts for s in p["stems"]]
    temperature = identifiable_temperature(logits, y)  # per window, as the service scales
    names, probs, y_clip = mean_by_clip(stems, softmax(logits, temperature), y)
    metrics = classification_metrics(y_clip, probs.argmax(1), labels)
    lo, hi = wilson_interval(int((probs.argmax(1) == y_clip).sum()), len(y_clip))
    _, raw, _ = mean_by_clip(stems, softmax(logits), y)
    if len(parts) > 1:  # cross-fitted: each part's probabilities use a T fitted on the others
        cross = []
        for i, p in enumerate(parts):
            rest = [q for j, q in enumerate(parts) if j != i]
            t = identifiable_temperature(
                np.concatenate([q[key] for q in rest]), np.concatenate([q["targets"] for q in rest])
            )
            cross.append(softmax(p[key], t))
        _, after, _ = mean_by_clip(stems, np.concatenate(cross), y)
        fitted = "cross-fitted: each part's T fitted on the other parts"
    else:
        after = probs
        fitted = "T fitted on these same held-out clips: in-sample, optimistic"
    return {
        "clips": len(names),
        "windows": len(stems),
        "weights": key.removeprefix("logits_"),
        "accuracy": metrics["accuracy"],
        "ci95": [lo, hi],
        "macro_f1": metrics["macro_f1"],
        "per_class": metrics["per_class"],
        "confusion": metrics["confusion"],
        "temperature": temperature,
        "ece_before": expected_calibration_error(raw, y_clip),
        "ece_after": expected_calibration_error(after, y_clip),
        "ece_after_how": fitted,
        "parts": k,
    }


# --------------------------------------------------------------------------- export


def update_checkpoint(path: Path, **fields: Any) -> None:
    """Add fields to a checkpoint in place (its calibration, the estimate in its metrics)."""
    ckpt = load_checkpoint(path)
    for k, v in fields.items():
        ckpt[k] = {**(ckpt.get(k) or {}), **v} if isinstance(v, dict) else v
    tmp = path.with_suffix(".pt.tmp")
    torch.save(ckpt, tmp)
    tmp.replace(path)


def export_version(cfg: FinetuneConfig, final_pt: Path, sel: FolderSelection, stage: Path) -> dict:
    """model.onnx (int8), explain.onnx and verify.json into `stage`; the verification report."""
    from export.clips import spread
    from export.onnx_export import export_explain, export_onnx, metadata_from_checkpoint
    from export.quantize import quantize_int8
    from export.verify import Artifact, Thresholds, verify_artifacts
    from export.verify_cli import torch_runner

    ckpt = load_checkpoint(final_pt)
    model = model_from_checkpoint(ckpt)
    meta = metadata_from_checkpoint(ckpt, final_pt, cfg.name)
    fp32 = export_onnx(model, cfg.out / "model.fp32.onnx", meta, "fp32")
    calib = spread(sel.clips, cfg.calibration_clips)
    # whole batches of the calibration reader (8): ORT's percentile collector cannot stack a
    # short last batch with full ones
    if len(calib) > 8:
        calib = calib[: len(calib) // 8 * 8]
    quantize_int8(
        fp32,
        stage / "model.onnx",
        D.load_waveforms(calib),
        meta,
        calibration_info={
            "source": "training windows of the fine-tuning folder, spread over classes",
            "classes": len({c.target for c in calib}),
        },
    )
    export_explain(model, stage / "explain.onnx", meta)
    checked = spread(sel.clips, cfg.verify_clips)
    report = verify_artifacts(
        torch_runner(model),
        [Artifact("fp32", fp32), Artifact("int8", stage / "model.onnx")],
        D.load_waveforms(checked),
        np.array([c.target for c in checked]),
        Thresholds(),
    )
    report["variants"]["int8"]["path"] = "model.onnx"
    report["int8_calibration_windows"] = len(calib)
    report["variants"]["fp32"]["path"] = (
        "fp32 graph the int8 one was quantised from (kept in the work folder)"
    )
    report.update(
        model_name=cfg.name,
        checkpoint_sha256=sha256_file(final_pt),
        clips={
            "count": len(checked),
            "description": f"{len(checked)} windows of the folder spread over classes; the "
            "final model trained on them, so accuracy is optimistic (parity is unaffected)",
            "held_out": False,
        },
        thresholds=asdict(Thresholds()),
        created_at=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    )
    (stage / "verify.json").write_text(json.dumps(report, indent=2) + "\n")
    return report


# --------------------------------------------------------------------------- card


def render_card(cfg: FinetuneConfig, summary: dict, sel: FolderSelection) -> str:
    from .card import LICENCE

    est, ver, t = summary["estimate"], summary.get("verify"), summary["timing"]
    init = summary["init_from"]
    per_class_clips = {lab: 0 for lab in sel.labels}
    for c in sel.clips:
        per_class_clips[c.category] += c.offset == 0
    lines = [
        f"# Model card: {cfg.name}",
        "",
        f"Fine-tuned from `{init['checkpoint']}` (sha256 `{init['sha256'][:16]}...`, "
        f"{init['labels']} classes): its log-mel front-end and ResNet CNN, a new "
        f"classifier head for **{len(sel.labels)} classes**: {', '.join(sel.labels)}. "
        "Input: waveform (B, 220500) float32 at 44.1 kHz (5-s windows); longer audio is "
        "scored by the service as the mean of its windows.",
        "",
        "## Data",
        "",
        f"- folder `{cfg.data}` ({sel.layout} layout): {sel.files} files, "
        f"{sel.seconds / 60:.1f} min of audio, {len(sel.clips)} 5-s windows, "
        f"{len({c.src_file for c in sel.clips})} groups",
        f"- {sel.padded} files shorter than 5 s were zero-padded to 5 s; {sel.windowed} longer "
        "than 5.1 s were cut into windows every 2.5 s plus one at the end (the service's "
        "windows); every window trains with its file's label and group",
        "- clips per class: " + ", ".join(f"{k} {v}" for k, v in per_class_clips.items()),
        "",
        "## How good is it",
        "",
        f"Estimate: **{summary['estimate_kind']}**. The recipe below trained on the other clips "
        "with the same schedule and scored these, never hearing their groups; a clip's score is "
        "the mean of its windows' probabilities."
        + (
            " The published model then trained on every clip, so no clip is unseen by it."
            if not cfg.estimate_only
            else " (An estimate-only run: no final fit, nothing published.)"
        ),
        "",
        f"- clips scored: {est['clips']} ({est['windows']} windows), {est['weights']} weights",
        *(
            [
                f"- **optimistic**: {summary['heard_by_base']} of the {sel.files} files are clips "
                "the base model itself trained on (they lie in its data folder and were not "
                "held out from it), so the held-out ones are not new to its fixed stages"
            ]
            if summary.get("heard_by_base")
            else []
        ),
        f"- accuracy **{est['accuracy']:.3f}** (95 % Wilson interval {est['ci95'][0]:.3f}-"
        f"{est['ci95'][1]:.3f}), macro-F1 {est['macro_f1']:.3f}",
        "",
        "| class | precision | recall | F1 | clips |",
        "|---|---|---|---|---|",
        *(
            f"| {r['label']} | {r['precision']:.2f} | {r['recall']:.2f} | {r['f1']:.2f} | "
            f"{r['support']} |"
            for r in est["per_class"]
        ),
        "",
        "Confusion (rows: true, columns: predicted):",
        "",
        confusion_markdown(np.array(est["confusion"]), sel.labels),
        "",
        "## Calibration",
        "",
        f"- temperature **T = {est['temperature']:.3f}** (in the ONNX metadata; the service "
        "reports softmax(logits / T) per window), fitted on the estimate's held-out windows"
        + (
            " (the fit ran to its bound, every window right with room to spare: no temperature "
            "is identifiable there, so T = 1 keeps the logits as trained)"
            if est["temperature"] == 1.0
            else ""
        ),
        f"- expected calibration error (15 bins, clips) {est['ece_before']:.3f} before, "
        f"{est['ece_after']:.3f} after ({est['ece_after_how']})",
        "",
        "## Training",
        "",
        f"- schedule: {cfg.epochs} epochs per run, batch {cfg.batch_size}, AdamW one-cycle "
        f"peak lr {cfg.lr:g}, EMA {cfg.ema_decay} (published), the recipe's augmentation "
        "(between-class mixing, time shift and stretch, SpecAugment)",
        f"- frozen: {', '.join(init['frozen']) or 'nothing (every layer trained)'}",
        f"- device: {summary['device']}, {summary['threads']} threads, amp: **{summary['amp']}**",
        f"- time: {t['total_s'] / 60:.1f} min in all (estimate runs {t['estimate_s'] / 60:.1f}, "
        f"final fit {t['final_s'] / 60:.1f}, export and verification {t['export_s'] / 60:.1f}); "
        f"training {t['train_windows_per_s']:.1f} windows/s",
        f"- command: `{summary['command']}`",
        "",
    ]
    if ver:
        i8, f32 = ver["variants"]["int8"], ver["variants"]["fp32"]
        lines += [
            "## Export and verification",
            "",
            f"- `model.onnx`: int8 (static QDQ, calibrated on {ver['int8_calibration_windows']} "
            "training windows), front-end and classifier in FP32; `explain.onnx`: the fp32 "
            "explain graph",
            f"- on {ver['clips']['count']} windows: int8 top-1 agreement with PyTorch "
            f"{i8.get('top1_agreement', 0):.1%}, fp32 {f32.get('top1_agreement', 0):.1%} "
            f"(max |Δlogit| {f32.get('max_abs_logit_diff', float('nan')):.1e}); "
            f"verification {'passed' if ver['passed'] else 'FAILED'} (verify.json)",
            "",
        ]
    lines += [LICENCE.replace("Trained on clips of", "Started from weights trained on clips of")]
    return "\n".join(lines)


# --------------------------------------------------------------------------- the job


def finetune(cfg: FinetuneConfig, command: str = "") -> dict:
    """The whole job; returns its summary (also written to WORK/finetune.json)."""
    from .publish import check_name, publish, staging

    t0 = time.perf_counter()
    load_before = os.getloadavg()
    check_name(cfg.name)
    if not is_labelled_folder(cfg.data):
        raise D.DataError(
            f"{cfg.data} is not a labelled folder (DATA/<label>/... or DATA/labels.csv); "
            "ESC-50 itself: `python -m train esc10-folder OUT` lays it out as one"
        )
    sel = select_folder(cfg.data)
    log.info("data %s: %s", cfg.data, sel.describe())
    p = plan(cfg, sel)
    log.info(
        "plan: estimate by %s, %d run(s) + %s, %d epochs each, %d steps",
        p.kind,
        len(p.estimate),
        "no final fit" if p.final is None else "the final fit",
        cfg.epochs,
        p.steps,
    )
    cfg.out.mkdir(parents=True, exist_ok=True)
    progress = Progress(p.steps)
    try:
        results = [
            run_one(tc, progress, f"estimate {i + 1}/{len(p.estimate)}")
            for i, tc in enumerate(p.estimate)
        ]
        t_est = time.perf_counter()
        est = pooled_estimate(results, sel.labels, len(p.estimate))
        write_report(
            cfg.out, "estimate", {**est, "n": est["clips"]}, sel.labels, {"estimate": p.kind}
        )
        final = run_one(p.final, progress, "final fit") if p.final else None
        t_final = time.perf_counter()
    finally:
        progress.close()
    runs = [*results, *([final] if final else [])]
    summary: dict[str, Any] = {
        "name": cfg.name,
        "data": {"folder": cfg.data, **sel.describe()},
        "estimate_kind": p.kind,
        "estimate": est,
        "config": {k: v for k, v in asdict(cfg).items() if k != "train_args"},
        "amp": runs[0].amp,
        "device": device_name(resolve_device(cfg.device)),
        "threads": torch.get_num_threads(),
        "command": command,
        "init_from": load_checkpoint(results[0].final_pt)["init_from"],
        "heard_by_base": heard_by_base(sel, load_checkpoint(cfg.base)),
    }
    if final is not None:
        update_checkpoint(
            final.final_pt,
            calibration={
                "temperature": est["temperature"],
                "fitted_on": f"held-out windows of the estimate ({p.kind}, {est['windows']})",
                "ece_before": est["ece_before"],
                "ece_after": est["ece_after"],
            },
            metrics={
                "estimate_accuracy": est["accuracy"],
                "estimate_macro_f1": est["macro_f1"],
                "estimate_clips": est["clips"],
            },
        )
        with staging(cfg.repository, cfg.name) as stage:
            summary["verify"] = export_version(cfg, final.final_pt, sel, stage)
            t_export = time.perf_counter()
            summary["timing"] = _timing(t0, t_est, t_final, t_export, runs)
            (stage / "MODEL_CARD.md").write_text(render_card(cfg, summary, sel))
            if not summary["verify"]["passed"]:
                shutil.copy(stage / "verify.json", cfg.out / "verify.json")
                raise D.DataError(
                    "verification failed, nothing published: "
                    + "; ".join(
                        f"{v}: {', '.join(r['failures'])}"
                        for v, r in summary["verify"]["variants"].items()
                        if r["failures"]
                    )
                    + f" (report: {cfg.out / 'verify.json'})"
                )
            shutil.copy(stage / "MODEL_CARD.md", cfg.out / "MODEL_CARD.md")
            summary["published"] = str(publish(stage))
            summary["version"] = int(Path(summary["published"]).name)
    else:
        summary["timing"] = _timing(t0, t_est, t_final, t_final, runs)
    summary["timing"]["total_s"] = round(time.perf_counter() - t0, 1)
    summary["load_average"] = {"start": load_before[0], "end": os.getloadavg()[0]}
    (cfg.out / "finetune.json").write_text(json.dumps(summary, indent=2) + "\n")
    if cfg.report:
        Path(cfg.report).write_text(run_report(cfg, summary, sel))
    return summary


def run_report(cfg: FinetuneConfig, summary: dict, sel: FolderSelection) -> str:
    """The run as a report to commit: how it was made, on what, how long, and the card."""
    load = summary["load_average"]
    head = [
        f"# Fine-tuning run: {cfg.name}",
        "",
        f"- command: `{summary['command']}`",
        f"- machine: {summary['device']} ({os.cpu_count()} logical CPUs, "
        f"{summary['threads']} torch threads); shared with other jobs: 1-min load average "
        f"{load['start']:.1f} at the start, {load['end']:.1f} at the end",
        f"- published: `{summary.get('published', 'nothing (estimate only)')}`",
        "",
        "```",
        describe(summary),
        "```",
        "",
    ]
    card = render_card(cfg, summary, sel).split("\n", 1)[1]  # without its title
    return "\n".join([*head, "## The model card"]) + card.replace("\n## ", "\n### ")


def _timing(t0: float, t_est: float, t_final: float, t_export: float, runs: list) -> dict:
    train_s = sum(r.train_seconds for r in runs)
    return {
        "estimate_s": round(t_est - t0, 1),
        "final_s": round(t_final - t_est, 1),
        "export_s": round(t_export - t_final, 1),
        "total_s": round(t_export - t0, 1),
        "train_s": round(train_s, 1),
        "train_windows_per_s": sum(r.window_steps for r in runs) / max(train_s, 1e-9),
    }


def describe(summary: dict) -> str:
    """What the command prints when it is done."""
    est, t = summary["estimate"], summary["timing"]
    lines = []
    if "published" in summary:
        lines.append(
            f"published {summary['published']} (version {summary['version']}: model.onnx "
            "int8, explain.onnx, verify.json, MODEL_CARD.md)"
        )
    lines += [
        f"estimate ({summary['estimate_kind']}): accuracy {est['accuracy']:.3f} "
        f"(95 % CI {est['ci95'][0]:.3f}-{est['ci95'][1]:.3f}), macro-F1 {est['macro_f1']:.3f} "
        f"on {est['clips']} held-out clips",
        f"calibration: T = {est['temperature']:.3f}, ECE {est['ece_before']:.3f} -> "
        f"{est['ece_after']:.3f}",
    ]
    if v := summary.get("verify"):
        lines.append(
            f"int8 vs PyTorch: top-1 agreement {v['variants']['int8']['top1_agreement']:.1%} "
            f"on {v['clips']['count']} windows"
        )
    lines.append(
        f"took {t['total_s'] / 60:.1f} min on {summary['device']} (amp {summary['amp']}), "
        f"training {t['train_windows_per_s']:.1f} windows/s"
    )
    return "\n".join(lines)


# --------------------------------------------------------------------------- command line


def parser() -> argparse.ArgumentParser:
    d = FinetuneConfig(data="", name="")
    p = argparse.ArgumentParser(
        prog="python -m train finetune",
        description="Fine-tune the shipped model on a labelled folder; publish a new version.",
    )
    p.add_argument("--data", required=True, help="DATA/<label>/*.wav|flac|... or DATA/labels.csv")
    p.add_argument("--name", required=True, help="model name in the repository")
    p.add_argument(
        "--repository",
        default=os.environ.get("ESC50_MODEL_REPOSITORY") or d.repository,
        help="model repository (default: $ESC50_MODEL_REPOSITORY, else models/repository)",
    )
    p.add_argument("--base", default=d.base, help="checkpoint to start from")
    p.add_argument("--epochs", type=int, default=d.epochs)
    p.add_argument("--freeze-stages", type=int, default=d.freeze_stages, help="0-4")
    p.add_argument("--amp", choices=("auto", "bf16", "off"), default=d.amp)
    p.add_argument("--folds", type=int, default=d.folds, help="0: held-out split; K>=2: k-fold")
    p.add_argument("--val-fraction", type=float, default=d.val_fraction)
    p.add_argument("--batch-size", type=int, default=d.batch_size)
    p.add_argument("--lr", type=float, default=d.lr)
    p.add_argument("--ema-decay", type=float, default=d.ema_decay)
    p.add_argument("--device", default=d.device)
    p.add_argument("--threads", type=int, default=d.threads)
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--work-dir", default="", help="default runs/finetune/NAME")
    p.add_argument("--calibration-clips", type=int, default=d.calibration_clips)
    p.add_argument("--verify-clips", type=int, default=d.verify_clips)
    p.add_argument("--estimate-only", action="store_true", help="no final fit, export or publish")
    p.add_argument("--report", default="", help="also write a markdown run report here")
    return p


def main(argv: list[str]) -> int:
    from contract.errors import ExportError
    from contract.metadata import MetadataError

    from .publish import PublishError

    cfg = FinetuneConfig(**vars(parser().parse_args(argv)))
    command = "python -m train finetune " + " ".join(argv)
    try:
        summary = finetune(cfg, command)
    except (D.DataError, PublishError, ExportError, MetadataError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(describe(summary))
    print(f"details: {cfg.out / 'finetune.json'}")
    return 0
