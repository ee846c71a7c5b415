"""Ensemble distillation in miniature: the teacher averages logits, a distillation step moves
the student towards it, a teacher that heard the student's validation clips is refused, and
`train cv` gives each fold's student only the other seed's model of that same fold; plus a
bf16 training step on a CPU that has native bf16."""

import json
import subprocess
import sys
from dataclasses import replace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from train.checkpoint import save_checkpoint
from train.distill import (
    Teacher,
    TeacherError,
    distill_loss,
    eligible_teachers,
    ensemble_val_logits,
    held_out_problem,
)
from train.model import AudioClassifier, ModelConfig
from train.train import TrainConfig, autocast_dtype, cpu_bf16_flags, prepare_data, setup, train_step

TINY = ModelConfig(widths=(8, 16), depths=(1, 1), dropout=0.0)


def student_config(root, tmp_path, **kw) -> TrainConfig:
    base = TrainConfig(
        data_root=str(root),
        cv_folds=2,
        cv_index=0,
        epochs=12,
        batch_size=6,
        lr=0.01,
        model=TINY,
        out_dir=str(tmp_path / "run"),
        device="cpu",
        threads=1,
        amp="off",
    )
    return replace(base, **kw)


def save_teacher(path, labels, seed=1, sharpness=20.0, **data):
    """A random tiny CNN with confident (scaled) logits, recorded as having seen `data`."""
    torch.manual_seed(seed)
    model = AudioClassifier(ModelConfig(n_classes=len(labels), widths=(8, 16), depths=(1, 1)))
    with torch.no_grad():
        model.cnn.fc.weight.mul_(sharpness)
    save_checkpoint(path, model.eval(), labels, data=data)
    return path


def test_teacher_averages_its_members_logits():
    a, b = nn.Linear(4, 3), nn.Linear(4, 3)
    x = torch.randn(5, 4)
    teacher = Teacher([a, b], ["a", "b"])
    assert torch.allclose(teacher(x), (a(x) + b(x)) / 2, atol=1e-6)
    teacher.train()  # a teacher stays in eval mode (BatchNorm statistics, no dropout)
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())


def test_distill_loss_mixes_kl_and_soft_labels():
    s, t = torch.randn(4, 3), torch.randn(4, 3)
    target = torch.softmax(torch.randn(4, 3), 1)  # mixed clips: soft labels
    label = -(target * F.log_softmax(s, 1)).sum(1).mean()
    loss, kl = distill_loss(s, t, target, alpha=0.0, temperature=3.0)
    assert torch.allclose(loss, label)
    loss, kl = distill_loss(s, t, target, alpha=1.0, temperature=3.0)
    p_t = torch.softmax(t / 3, 1)
    expected = (p_t * (p_t.log() - F.log_softmax(s / 3, 1))).sum(1).mean() * 9
    assert torch.allclose(loss, expected, atol=1e-5) and torch.allclose(kl, expected, atol=1e-5)
    assert distill_loss(t, t, target, 1.0, 3.0)[1].abs() < 1e-6  # no gap, no KL


def val_kl(run) -> float:
    """KL(teacher || student) on the validation clips, both in eval mode."""
    run.model.eval()
    with torch.no_grad():
        feats = run.model.frontend(torch.from_numpy(run.val_waves))
        s, t = run.model.cnn(feats), run.teacher(feats)
    run.model.train()
    return F.kl_div(F.log_softmax(s, 1), F.log_softmax(t, 1), log_target=True, reduction="sum")


def test_distillation_steps_move_the_student_towards_the_teacher(synthetic_esc50, tmp_path):
    cfg = student_config(synthetic_esc50, tmp_path, distill_alpha=1.0)
    labels, train_clips, val_clips, _ = prepare_data(cfg)
    teacher = save_teacher(
        tmp_path / "t.pt",
        labels,
        train_stems=[c.stem for c in train_clips],
        val_stems=[c.stem for c in val_clips],
    )
    run = setup(replace(cfg, teachers=[str(teacher)]))
    assert run.teacher is not None and run.info["distillation"]["alpha"] == 1.0
    before = val_kl(run)
    kls = []
    for _ in range(10):
        train_step(run, torch.arange(len(run.train_clips)))
        kls.append(run.last_kl)
    assert val_kl(run) < 0.85 * before
    assert np.mean(kls[-3:]) < 0.7 * np.mean(kls[:3])


def test_a_teacher_that_trained_on_the_validation_clips_is_refused(synthetic_esc50, tmp_path):
    cfg = student_config(synthetic_esc50, tmp_path)
    labels, train_clips, val_clips, _ = prepare_data(cfg)
    leaky = save_teacher(
        tmp_path / "leaky.pt",
        labels,
        train_stems=[c.stem for c in train_clips] + [val_clips[0].stem],
        val_stems=[c.stem for c in val_clips[1:]],
    )
    with pytest.raises(TeacherError, match="trained on 1 of the student's"):
        setup(replace(cfg, teachers=[str(leaky)]))
    # an older checkpoint that names only its validation clips is read cautiously: it trained
    # on every clip it did not hold out
    old = save_teacher(tmp_path / "old.pt", labels, val_stems=[c.stem for c in val_clips[1:]])
    with pytest.raises(TeacherError, match="refusing teacher"):
        setup(replace(cfg, teachers=[str(old)]))
    other_labels = save_teacher(tmp_path / "labels.pt", labels[::-1], val_stems=[])
    with pytest.raises(TeacherError, match="other labels"):
        setup(replace(cfg, teachers=[str(other_labels)]))


def test_each_fold_gets_only_teachers_that_held_it_out():
    stems = [f"s{i}" for i in range(6)]
    records = {
        "seed1-fold0": {"val_stems": stems[:3], "train_stems": stems[3:]},
        "seed1-fold1": {"val_stems": stems[3:], "train_stems": stems[:3]},
        "seed2-fold0": {"val_stems": stems[:3]},  # no train_stems: all but its val clips
        "seed1-final": {"val_stems": [], "train_stems": stems},
    }
    assert eligible_teachers(records, stems[:3], stems) == ["seed1-fold0", "seed2-fold0"]
    assert eligible_teachers(records, stems[3:], stems) == ["seed1-fold1"]
    assert eligible_teachers(records, [], stems) == ["seed1-final"]  # the all-clip student
    assert "trained on 3 of the student's 3" in held_out_problem(
        records["seed1-final"], stems[:3], stems
    )


def test_ensemble_score_averages_teacher_logits_by_stem(tmp_path):
    for name, order, scale in (("a", [0, 1, 2], 1.0), ("b", [2, 0, 1], 3.0)):
        (tmp_path / name).mkdir()
        stems = np.array(["x", "y", "z"])[order]
        logits = scale * np.eye(3, dtype=np.float32)[order]
        np.savez(tmp_path / name / "val_logits.npz", stems=stems, logits_ema=logits)
    got = ensemble_val_logits(
        [tmp_path / "a" / "final.pt", tmp_path / "b" / "final.pt"], ["x", "z"]
    )
    assert np.allclose(got, [[2, 0, 0], [0, 0, 2]])
    with pytest.raises(TeacherError, match="did not score"):
        ensemble_val_logits([tmp_path / "a" / "final.pt"], ["w"])


def test_amp_modes(monkeypatch):
    cpu = torch.device("cpu")
    assert autocast_dtype("off", cpu) is None
    monkeypatch.setattr("train.train.cpu_bf16_flags", lambda: [])
    assert autocast_dtype("auto", cpu) is None  # fp32 fallback where bf16 would be emulated
    assert autocast_dtype("bf16", cpu) is torch.bfloat16
    monkeypatch.setattr("train.train.cpu_bf16_flags", lambda: ["amx_bf16"])
    assert autocast_dtype("auto", cpu) is torch.bfloat16


@pytest.mark.skipif(not cpu_bf16_flags(), reason="this CPU has neither AVX-512 BF16 nor AMX")
def test_bf16_training_step_on_cpu(synthetic_esc50, tmp_path):
    run = setup(student_config(synthetic_esc50, tmp_path, amp="auto"))
    assert run.amp is torch.bfloat16 and run.info["amp"] == "bfloat16"
    seen = []
    run.model.cnn.fc.register_forward_hook(lambda m, i, o: seen.append(o.dtype))
    before = run.model.cnn.fc.weight.detach().clone()
    loss, _ = train_step(run, torch.arange(len(run.train_clips)))
    assert seen == [torch.bfloat16] and np.isfinite(loss)
    assert run.model.cnn.fc.weight.dtype == torch.float32  # master weights stay FP32
    assert not torch.equal(before, run.model.cnn.fc.weight)


@pytest.mark.slow
def test_cv_distils_each_fold_from_the_other_seeds_same_fold(synthetic_esc50, tmp_path, repo_root):
    """Teachers: a 2-fold CV of seed 1 (split seed 0). Student: seed 0 with --teachers-dir.
    Fold k's student gets exactly the teacher of fold k; the report scores the ensemble."""

    def cv(out, *train_args):
        cmd = [sys.executable, "-m", "train", "cv", "--k", "2", "--parallel", "2"]
        cmd += ["--out-dir", str(out), "--data-root", str(synthetic_esc50), "--"]
        cmd += ["--epochs", "2", "--batch-size", "4", "--widths", "8,16", "--depths", "1,1"]
        cmd += ["--device", "cpu", "--threads", "1", "--split-seed", "0", *train_args]
        r = subprocess.run(cmd, cwd=repo_root, capture_output=True, text=True, timeout=240)
        assert r.returncode == 0, r.stderr[-3000:]
        return json.loads((out / "cv_report.json").read_text())

    cv(tmp_path / "t", "--seed", "1")
    report = cv(tmp_path / "s", "--seed", "0", "--teachers-dir", str(tmp_path / "t"))
    r = report["variants"]["recipe"]
    members = r["teacher_ensemble"]["members_per_fold"]
    assert members == [[str(tmp_path / "t" / "recipe" / f"fold{k}" / "final.pt")] for k in (0, 1)]
    assert r["teacher_ensemble"]["weights"]["ensemble"]["all"]["clips"] == 12
    from train.checkpoint import load_checkpoint

    student = load_checkpoint(tmp_path / "s" / "recipe" / "fold1" / "final.pt")
    assert student["distillation"]["teachers"] == members[1]
    assert "teacher ensemble" in (tmp_path / "s" / "cv_report.md").read_text()


def test_schedule_curve_and_teacher_dir_options():
    from train.cv import curve, strip_option

    def variant(acc):
        g = {"accuracy": acc, "ci95": [acc - 0.1, acc + 0.1]}
        return {"calibration": {"weights": "ema"}, "weights": {"ema": {"all": g, "esc10": g}}}

    report = {"variants": {"recipe@600ep": variant(0.8), "recipe@306ep": variant(0.7)}}
    points = curve(report, [306, 600])["recipe"]
    assert [(p["epochs"], p["esc10"]["accuracy"]) for p in points] == [(600, 0.8), (306, 0.7)]
    args = ["--seed", "0", "--teachers-dir", "a", "--teachers-dir=b", "--epochs", "3"]
    assert strip_option(args, "--teachers-dir") == (["--seed", "0", "--epochs", "3"], ["a", "b"])


def test_ship_rule_paired_test_on_the_same_clips():
    """`python -m train compare`: the test a distilled model must pass against the current."""
    from train.cv import mcnemar_exact, paired_comparison

    assert mcnemar_exact(0, 10) == pytest.approx(2 / 2**10)
    assert mcnemar_exact(5, 5) == 1.0 and mcnemar_exact(0, 0) == 1.0
    assert mcnemar_exact(3, 12) == pytest.approx(2 * (1 + 15 + 105 + 455) / 2**15)  # binomial
    stems = [f"c{i}" for i in range(40)]
    base = {s: (0, 0 if i < 20 else 1) for i, s in enumerate(stems)}  # right on 20
    new = {s: (0, 0 if i < 32 else 1) for i, s in enumerate(stems)}  # right on 32: 12 more
    r = paired_comparison(base, new, stems)
    assert (r["only_base_right"], r["only_new_right"]) == (0, 12)
    assert r["difference"] == pytest.approx(0.3) and r["mcnemar_exact_p"] < 0.001
    assert 0 < r["bootstrap_ci95"][0] < 0.3 < r["bootstrap_ci95"][1]


def test_cv_reads_the_students_split_as_the_run_makes_it(synthetic_esc50):
    from train.cv import student_split

    args = [
        "--data-root",
        str(synthetic_esc50),
        "--seed",
        "3",
        "--split-seed",
        "0",
        "--epochs",
        "2",
    ]
    for fold in (0, 1):
        cfg = TrainConfig(data_root=str(synthetic_esc50), seed=7, split_seed=0, cv_folds=2)
        _, _, val, _ = prepare_data(replace(cfg, cv_index=fold))
        assert student_split(args, 2, fold)[0] == [c.stem for c in val]
    assert student_split(args, 2, None)[0] == []  # the all-clip run validates on nothing
