"""The training recipe's parts: energy-aware crops, between-class mixing, the grouped K-fold
split, temperature scaling, and a smoke run of the whole shipped pipeline
(cross-validation + final run -> calibrate -> release -> model card) on generated clips."""

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from train.augment import AugmentConfig, Augmenter
from train.calibration import expected_calibration_error, fit_temperature, softmax, wilson_interval
from train.data import Clip, split_kfold

SR = 44100


def augmenter(waves, crop_s=1.0, crop_energy=0.5, stretch=0.0, mix="none", mix_prob=1.0, seed=0):
    cfg = AugmentConfig(
        crop_samples=int(crop_s * SR) if crop_s else 1 << 40,
        shift_samples=0,
        crop_energy=crop_energy,
        stretch=stretch,
        mix=mix,
        mix_prob=mix_prob,
        mixup_alpha=0.4,
        freq_masks=0,
        freq_mask_width=0,
        time_masks=0,
        time_mask_width=0,
    )
    targets = torch.arange(len(waves)) % 3
    return Augmenter(waves, targets, 3, cfg, torch.Generator().manual_seed(seed))


def sparse_event_clips(n=8):
    """5-s clips of near-silence with one 0.2-s burst at a different place in each."""
    waves = torch.randn(n, 5 * SR) * 1e-4
    for i in range(n):
        start = int((0.3 + 0.55 * i) * SR)
        waves[i, start : start + SR // 5] += torch.randn(SR // 5)
    return waves


def burst_fraction(crop: torch.Tensor) -> float:
    return float((crop.abs() > 0.01).float().mean())


def test_energy_aware_crops_hold_the_sparse_event():
    waves = sparse_event_clips()
    aug = augmenter(waves, crop_s=1.0, crop_energy=0.5)
    for _ in range(10):
        crops = aug.waveforms(torch.arange(len(waves)))
        assert crops.shape == (8, SR)
        # at least half the burst (0.1 s of 1 s) in every crop
        assert all(burst_fraction(c) > 0.08 for c in crops)


def test_uniform_crops_often_miss_it():
    """The reason for energy-aware placement: with crop_energy 0 most crops are silent."""
    waves = sparse_event_clips()
    aug = augmenter(waves, crop_s=1.0, crop_energy=0.0)
    crops = torch.cat([aug.waveforms(torch.arange(len(waves))) for _ in range(10)])
    missed = sum(burst_fraction(c) < 0.01 for c in crops)
    assert missed > len(crops) // 3


def test_stretch_resamples_a_tone_by_the_drawn_factor():
    t = torch.arange(5 * SR) / SR
    waves = torch.sin(2 * torch.pi * 1000 * t).repeat(4, 1)
    aug = augmenter(waves, crop_s=0, stretch=0.2)
    out = aug.waveforms(torch.arange(4)).numpy()
    peaks = [np.argmax(np.abs(np.fft.rfft(x[SR : 3 * SR]))) / 2.0 for x in out]  # Hz (2-s FFT)
    assert all(800 <= p <= 1200 for p in peaks)
    assert max(peaks) - min(peaks) > 20  # the factors differ per example


def test_between_class_mix_soft_targets():
    waves = torch.randn(6, 5 * SR)
    waves[0] *= 10  # a loud clip: its share of the mix follows loudness, not the ratio alone
    aug = augmenter(waves, crop_s=0, mix="bc", mix_prob=1.0)
    y = aug.targets[:6]
    mixed, target = aug.mix(waves, y)
    assert mixed.shape == waves.shape and torch.isfinite(mixed).all()
    assert torch.allclose(target.sum(1), torch.ones(6))
    assert (target.max(1).values < 1).any()  # soft labels
    none = augmenter(waves, crop_s=0, mix="bc", mix_prob=0.0)
    same, hard = none.mix(waves, y)
    assert torch.equal(same, waves) and torch.equal(hard.argmax(1), y)


def clips_with_groups():
    clips = []
    for target in range(3):
        for src in range(6):
            for take in "AB"[: 1 + (src % 2)]:  # some recordings give two clips
                stem = f"1-{target}{src}-{take}-{target}"
                clips.append(Clip(stem, None, 1, target, f"c{target}", False, f"{target}{src}"))
    return clips


def test_kfold_split_is_grouped_stratified_and_covers_every_clip_once():
    clips = clips_with_groups()
    k = 3
    seen = []
    for i in range(k):
        train, val = split_kfold(clips, k, i, seed=0)
        assert {c.src_file for c in train}.isdisjoint({c.src_file for c in val})
        assert len(train) + len(val) == len(clips)
        assert {c.target for c in val} == {0, 1, 2}  # every class in every part
        seen += [c.stem for c in val]
    assert sorted(seen) == sorted(c.stem for c in clips)


def test_temperature_fit_recovers_a_known_temperature():
    rng = np.random.default_rng(0)
    true_logits = rng.normal(size=(4000, 10)) * 3
    y = np.array([rng.choice(10, p=p) for p in softmax(true_logits)])
    t = fit_temperature(true_logits * 2.0, y)  # over-confident by 2x
    assert t == pytest.approx(2.0, rel=0.1)
    before = expected_calibration_error(softmax(true_logits * 2.0), y)
    after = expected_calibration_error(softmax(true_logits * 2.0, t), y)
    assert after < before / 2
    lo, hi = wilson_interval(90, 100)
    assert lo < 0.9 < hi and hi - lo < 0.15


@pytest.mark.slow
def test_shipped_recipe_smoke_cv_final_calibrate_release_card(synthetic_esc50, tmp_path, repo_root):
    """`make train-shipped` in miniature: the same commands, a tiny CNN and 2 epochs."""
    env_args = {"cwd": repo_root, "capture_output": True, "text": True, "timeout": 300}
    out = tmp_path / "cv"
    cmd = [
        sys.executable,
        "-m",
        "train",
        "cv",
        "--k",
        "2",
        "--final",
        "--parallel",
        "2",
        "--out-dir",
        str(out),
        "--data-root",
        str(synthetic_esc50),
        "--",
        "--epochs",
        "2",
        "--batch-size",
        "4",
        "--widths",
        "8,16",
        "--depths",
        "1,1",
        "--device",
        "cpu",
        "--threads",
        "1",
    ]
    r = subprocess.run(cmd, **env_args)
    assert r.returncode == 0, r.stderr[-3000:]
    report = json.loads((out / "cv_report.json").read_text())
    recipe = report["variants"]["recipe"]
    assert recipe["clips"] == 12  # every clip scored exactly once
    assert recipe["weights"]["ema"]["all"]["clips"] == 12
    assert 0.01 <= recipe["calibration"]["temperature"] <= 20
    final = out / "recipe" / "final" / "final.pt"
    for step in (
        ["calibrate", str(final), "--cv-report", str(out / "cv_report.json")],
        ["release", str(final), str(tmp_path / "m.pt")],
        [
            "card",
            str(tmp_path / "m.pt"),
            "--cv-report",
            str(out / "cv_report.json"),
            "--data-root",
            str(synthetic_esc50),
            "--out",
            str(tmp_path / "CARD.md"),
        ],
    ):
        r = subprocess.run([sys.executable, "-m", "train", *step], **env_args)
        assert r.returncode == 0, r.stderr[-3000:]
    from train.checkpoint import load_checkpoint

    ckpt = load_checkpoint(tmp_path / "m.pt")
    assert ckpt["calibration"]["temperature"] == recipe["calibration"]["temperature"]
    assert ckpt["weights"] == "ema" and ckpt["data"]["train_clips"] == 12
    card = (tmp_path / "CARD.md").read_text()
    assert "CC BY-NC 3.0" in card and f"T = {ckpt['calibration']['temperature']:.3f}" in card
    assert card.count("\n| ") >= 3 + 1 + 3  # group rows, variants, one row per class
