"""Ensemble distillation: several trained checkpoints teach one student of the same size.

The teacher is the average of its members' logits, computed on the very batch the student sees
(same crop, mix, stretch and SpecAugment), in eval mode and without gradients. The student's loss
is `alpha * KL(teacher/T || student/T) * T^2 + (1 - alpha) * the recipe's soft-label loss`
(Hinton et al.: T^2 keeps the soft term's gradient scale independent of T).

An honest estimate needs a teacher that never heard the student's validation clips: a teacher
that trained on them passes its knowledge of those very clips to the student, and the fold's
score goes up for no reason that would hold on new clips. `held_out_problem` checks it from the
teacher checkpoint's recorded data (`train_stems`, or everything but its `val_stems` when only
those were recorded: the cautious reading) and `load_teacher` refuses such a teacher.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .checkpoint import CheckpointError, load_checkpoint, model_from_checkpoint


class TeacherError(ValueError):
    """A teacher checkpoint cannot teach this student (data overlap, other labels or front-end)."""


def teacher_paths(teachers: list[str], teachers_dirs: list[str]) -> list[Path]:
    """--teacher files plus every final.pt under each --teachers-dir, in a stable order."""
    paths = [Path(t) for t in teachers]
    for d in teachers_dirs:
        found = sorted(Path(d).rglob("final.pt"))
        if not found:
            raise TeacherError(f"no final.pt under teachers dir {d}")
        paths += found
    return paths


def trained_stems(data: dict[str, Any], all_stems: list[str]) -> set[str]:
    """Clips a run may have trained on, from its checkpoint's `data` record: the record's
    `train_stems`, or (older checkpoints) all clips but its validation ones."""
    if data.get("train_stems") is not None:
        return set(data["train_stems"])
    return set(all_stems) - set(data.get("val_stems") or [])


def held_out_problem(data: dict[str, Any], val_stems: list[str], all_stems: list[str]) -> str:
    """Why a run (its checkpoint's `data`) may not teach a student validated on `val_stems`
    ("" if it may)."""
    overlap = sorted(trained_stems(data, all_stems) & set(val_stems))
    if not overlap:
        return ""
    return (
        f"it trained on {len(overlap)} of the student's {len(val_stems)} validation clips "
        f"(e.g. {', '.join(overlap[:3])})"
    )


class Teacher(nn.Module):
    """Averaged logits of several CNNs over the student's own (augmented) log-mel batch."""

    def __init__(self, cnns: list[nn.Module], sources: list[str]):
        super().__init__()
        if not cnns:
            raise TeacherError("a teacher needs at least one checkpoint")
        self.cnns = nn.ModuleList(cnns)
        self.sources = sources
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> Teacher:  # always eval: BatchNorm uses its statistics
        return super().train(False)

    @torch.no_grad()
    def forward(self, feats: torch.Tensor) -> torch.Tensor:
        return torch.stack([cnn(feats).float() for cnn in self.cnns]).mean(0)


def load_teacher(
    paths: list[Path],
    labels: list[str],
    frontend: dict[str, Any],
    val_stems: list[str],
    all_stems: list[str],
    device: torch.device,
) -> Teacher:
    """The ensemble of `paths`; TeacherError when one does not fit or saw a validation clip."""
    cnns = []
    for p in paths:
        try:
            ckpt = load_checkpoint(p)
        except CheckpointError as e:
            raise TeacherError(str(e)) from None
        if list(ckpt["labels"]) != list(labels):
            raise TeacherError(f"teacher {p} has other labels than the student")
        if dict(ckpt["frontend_config"]) != dict(frontend):
            raise TeacherError(f"teacher {p} has another front-end: its logits mean other inputs")
        if why := held_out_problem(ckpt.get("data") or {}, val_stems, all_stems):
            raise TeacherError(f"refusing teacher {p}: {why}")
        cnns.append(model_from_checkpoint(ckpt).cnn)
    return Teacher(cnns, [str(p) for p in paths]).to(device)


def distill_loss(
    logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    target: torch.Tensor,
    alpha: float,
    temperature: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(total loss, the KL term before weighting) for student `logits` and soft `target`s."""
    t = temperature
    kl = F.kl_div(
        F.log_softmax(logits / t, 1),
        F.log_softmax(teacher_logits.float() / t, 1),
        log_target=True,
        reduction="batchmean",
    ) * (t * t)
    label = -(target * F.log_softmax(logits, 1)).sum(1).mean()
    return alpha * kl + (1 - alpha) * label, kl


def ensemble_val_logits(teacher_ckpts: list[Path], stems: np.ndarray) -> np.ndarray:
    """Averaged validation logits (the shipped weights: EMA when present) of teacher runs, read
    from the `val_logits.npz` each run wrote beside its final.pt, in the order of `stems`."""
    rows = []
    for p in teacher_ckpts:
        z = np.load(Path(p).with_name("val_logits.npz"))
        key = "logits_ema" if "logits_ema" in z.files else "logits_raw"
        where = {str(s): i for i, s in enumerate(z["stems"])}
        missing = [str(s) for s in stems if str(s) not in where]
        if missing:
            raise TeacherError(f"teacher {p} did not score {len(missing)} of the fold's clips")
        rows.append(z[key][[where[str(s)] for s in stems]])
    return np.mean(rows, axis=0)


def data_records(paths: list[Path]) -> dict[Path, dict[str, Any]]:
    """Each checkpoint's record of the clips it saw (`data`), read once."""
    records = {}
    for p in paths:
        try:
            records[p] = load_checkpoint(p).get("data") or {}
        except CheckpointError as e:
            raise TeacherError(str(e)) from None
    return records


def eligible_teachers(
    records: dict[Path, dict[str, Any]], val_stems: list[str], all_stems: list[str]
) -> list[Path]:
    """The runs that may teach a student validated on `val_stems`: those that never trained on
    one of them; for a student without validation clips (an all-clip run), the runs that
    trained on all clips too (the other seeds' final runs)."""
    if not val_stems:
        return [p for p, d in records.items() if not d.get("val_stems")]
    return [p for p, d in records.items() if not held_out_problem(d, val_stems, all_stems)]
