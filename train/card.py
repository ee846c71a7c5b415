"""Render a model card (markdown) from a checkpoint and its validation report."""

from __future__ import annotations

import json
from pathlib import Path

from export.files import sha256_file

from .checkpoint import load_checkpoint, model_from_checkpoint
from .model import count_parameters

LICENCE = """\
## Data licence and attribution

Trained on clips of **ESC-50** by Karol J. Piczak, licensed **CC BY-NC 3.0**
(Creative Commons Attribution-NonCommercial 3.0); the clips come from freesound.org
recordings, attributed in github.com/karolpiczak/ESC-50. The weights are derived from that
data: **non-commercial use only**. The code is MIT (see LICENSE).

> K. J. Piczak. ESC: Dataset for Environmental Sound Classification.
> Proceedings of the 23rd ACM International Conference on Multimedia (ACM MM 2015).
> doi:10.1145/2733373.2806390
"""


ESC10 = {"dog", "rooster", "rain", "sea_waves", "crackling_fire", "crying_baby", "sneezing",
         "clock_tick", "helicopter", "chainsaw"}  # fmt: skip


def group_accuracy(per_class: list[dict], inside: bool) -> tuple[float, int]:
    rows = [r for r in per_class if (r["label"] in ESC10) == inside]
    n = sum(r["support"] for r in rows)
    return (sum(r["recall"] * r["support"] for r in rows) / n if n else 0.0), n


def split_line(data: dict, rep: dict) -> str:
    if data["val_clips"]:
        return (f"- split: {data['train_clips']} training clips, {data['val_clips']} held-out "
                "validation clips chosen per class and grouped by source recording (no "
                "recording on both sides)")  # fmt: skip
    return (f"- split: all {data['train_clips']} clips trained on. The validation figures below "
            f"come from the recipe run: the same recipe and epochs trained on a split that held "
            f"out {rep['n']} clips (grouped by source recording); this model has seen those "
            "clips, so they estimate, not measure, its accuracy")  # fmt: skip


def render(checkpoint: str | Path, report: str | Path, command: str, machine: str,
           notes: str = "") -> str:  # fmt: skip
    ckpt = load_checkpoint(checkpoint)
    rep = json.loads(Path(report).read_text())
    m, tc, data = ckpt["metrics"], ckpt["train_config"], ckpt["data"]
    n_params = count_parameters(model_from_checkpoint(ckpt).cnn)
    keys = ("epochs", "batch_size", "lr", "weight_decay", "warmup_pct", "label_smoothing",
            "mixup_alpha", "crop_seconds", "gain_db", "freq_masks", "freq_mask_width",
            "time_masks", "time_mask_width", "val_fraction", "seed")  # fmt: skip
    recipe = {k: tc[k] for k in keys}
    lines = [
        "# Model card: esc50-resnet34",
        "",
        "ResNet-34-style CNN over a 128-band log-mel front-end that is part of the model:",
        "**waveform (B, 220500) float32 at 44.1 kHz in, 50 logits out** (ESC-50 classes).",
        "",
        f"- parameters: {n_params:,} (CNN; the front-end has none)",
        f"- file: `{Path(checkpoint).name}`, weights stored as "
        f"{ckpt.get('weights_dtype', 'float32')}, sha256 `{sha256_file(checkpoint)[:16]}...`",
        f"- code version: `{ckpt['code_version']}`, saved {ckpt['saved_at']}",
        f"- front-end: {json.dumps(ckpt['frontend_config'])}",
        "",
        "## Training",
        "",
        f"- command: `{command}`",
        f"- machine: {machine}; wall time {m.get('wall_seconds', 0) / 60:.0f} min",
        f"- data: `{data['root']}`, folds {data['folds']}, {data['clips']} clips present "
        f"({data['missing']} of the official 2000 absent), {data['classes_present']} classes",
        split_line(data, rep),
        f"- recipe: AdamW + one-cycle, {json.dumps(recipe)}",
        "- the checkpoint is the last epoch of a fixed schedule: no epoch or checkpoint was "
        "picked on the validation clips",
        "",
        "## Validation (held-out clips, never trained on)"
        if data["val_clips"]
        else "## Validation of the recipe (the recipe run's held-out clips)",
        "",
        f"- accuracy **{rep['accuracy']:.3f}**, macro-F1 **{rep['macro_f1']:.3f}** on "
        f"{rep['n']} clips",
        "- by group: accuracy {:.3f} on the {} clips of the 10 ESC-10 classes (32 clips each in "
        "the local copy), {:.3f} on the {} clips of the other 40 classes (8 each)".format(
            *group_accuracy(rep["per_class"], True), *group_accuracy(rep["per_class"], False)
        ),
        f"- last-epoch training loss {m.get('train_loss', float('nan')):.3f} "
        "(with mixup and label smoothing)",
        "",
        notes,
        "",
        "| class | precision | recall | F1 | support |",
        "|---|---|---|---|---|",
        *(
            f"| {r['label']} | {r['precision']:.2f} | {r['recall']:.2f} | {r['f1']:.2f} | "
            f"{r['support']} |"
            for r in rep["per_class"]
        ),  # fmt: skip
        "",
        "![confusion matrix](validation_confusion.png)",
        "",
        LICENCE,
    ]
    return "\n".join(lines)
