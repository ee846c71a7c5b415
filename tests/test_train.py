"""Training end to end: smoke run, self-describing checkpoint, resume, evaluation, 2-process DDP."""

import json
import os
import subprocess
import sys

import pytest
import torch

from train.checkpoint import (
    CheckpointError,
    load_checkpoint,
    model_from_checkpoint,
    release_checkpoint,
)
from train.model import count_parameters

TINY = ["--widths", "8,16", "--depths", "1,1"]


def run_train(args, cwd, nproc: int = 1, timeout: int = 180):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "train", *args]
    if nproc > 1:
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            f"--nproc-per-node={nproc}",
            "-m",
            "train",
            *args,
        ]
    r = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, r.stderr[-3000:]
    return r


def test_smoke_run_full_model(synthetic_esc50, tmp_path, repo_root):
    """ResNet-34 itself, 1 epoch on 8 clips: produces a complete, loadable checkpoint."""
    out = tmp_path / "run"
    run_train(
        [
            "--data-root",
            str(synthetic_esc50),
            "--epochs",
            "1",
            "--batch-size",
            "4",
            "--crop-seconds",
            "1",
            "--val-fraction",
            "0.25",
            "--out-dir",
            str(out),
        ],
        repo_root,
    )
    ckpt = load_checkpoint(out / "final.pt")
    assert ckpt["labels"] == ["dog", "rain", "siren"]
    assert ckpt["model_config"]["depths"] == [3, 4, 6, 3]
    assert ckpt["frontend_config"]["n_mels"] == 128
    assert ckpt["train_config"]["epochs"] == 1
    assert ckpt["data"]["train_clips"] + ckpt["data"]["val_clips"] == 12
    assert {"val_acc", "val_macro_f1", "train_loss", "wall_seconds"} <= set(ckpt["metrics"])
    assert ckpt["code_version"]
    assert "optimizer" not in ckpt  # final.pt is for use, last.pt for resuming
    model = model_from_checkpoint(ckpt)
    assert count_parameters(model.cnn) == 21_304_050 - 47 * 513  # 3 classes, not 50
    report = json.loads((out / "validation.json").read_text())
    assert report["n"] == ckpt["data"]["val_clips"] and "per_class" in report
    assert (out / "validation_confusion.png").stat().st_size > 1000
    lines = (out / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 1 and json.loads(lines[0])["epoch"] == 1


def test_resume_continues_and_learns(synthetic_esc50, tmp_path, repo_root):
    out = tmp_path / "run"
    args = [
        "--data-root",
        str(synthetic_esc50),
        "--batch-size",
        "4",
        "--crop-seconds",
        "1",
        "--val-fraction",
        "0",
        "--mix",
        "none",
        "--lr",
        "0.01",
        "--out-dir",
        str(out),
        *TINY,
    ]
    run_train([*args, "--epochs", "8", "--stop-after", "2"], repo_root)
    assert load_checkpoint(out / "last.pt")["epoch"] == 2
    assert not (out / "final.pt").exists()  # interrupted: no final checkpoint yet
    r = run_train([*args, "--epochs", "8", "--resume"], repo_root)
    assert "resumed from" in r.stderr
    epochs = [json.loads(x)["epoch"] for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert epochs == list(range(1, 9))
    losses = [json.loads(x)["train_loss"] for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert losses[-1] < losses[0]  # three separable tones: the loss must go down


def test_evaluate_and_release(synthetic_esc50, tmp_path, repo_root):
    out = tmp_path / "run"
    run_train(
        [
            "--data-root",
            str(synthetic_esc50),
            "--epochs",
            "1",
            "--batch-size",
            "4",
            "--crop-seconds",
            "1",
            "--val-fraction",
            "0",
            "--out-dir",
            str(out),
            *TINY,
        ],
        repo_root,
    )
    small = tmp_path / "release.pt"
    release_checkpoint(out / "final.pt", small)
    ckpt = load_checkpoint(small)
    assert all(
        v.dtype == torch.float16 for v in ckpt["state_dict"].values() if v.is_floating_point()
    )
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "train",
            "evaluate",
            str(small),
            "--data-root",
            str(synthetic_esc50),
            "--out-dir",
            str(tmp_path / "rep"),
        ],
        cwd=repo_root,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 0, r.stderr
    result = json.loads(r.stdout)
    assert result["n"] == 12 and 0.0 <= result["accuracy"] <= 1.0
    assert (tmp_path / "rep" / "evaluation.md").read_text().count("|") > 10


def test_bad_checkpoint_and_bad_data_errors(tmp_path, repo_root):
    (tmp_path / "x.pt").write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match="cannot read"):
        load_checkpoint(tmp_path / "x.pt")
    with pytest.raises(CheckpointError, match="no checkpoint"):
        load_checkpoint(tmp_path / "missing.pt")
    cmd = [sys.executable, "-m", "train", "--data-root", str(tmp_path / "nope"), "--epochs", "1"]
    r = subprocess.run(cmd, cwd=repo_root, capture_output=True, text=True)
    assert r.returncode == 2 and "does not exist" in r.stderr and "Traceback" not in r.stderr


def test_ddp_two_processes_gloo(synthetic_esc50, tmp_path, repo_root):
    """torchrun, 2 CPU processes: the run completes, rank 0 alone writes, and the shards the
    two ranks drew each epoch (train.train.epoch_order, as the run called it) are disjoint and
    together cover every training clip once."""
    out = tmp_path / "ddp"
    run_train(
        [
            "--data-root",
            str(synthetic_esc50),
            "--epochs",
            "2",
            "--batch-size",
            "2",
            "--crop-seconds",
            "1",
            "--val-fraction",
            "0.25",
            "--device",
            "cpu",
            "--out-dir",
            str(out),
            *TINY,
        ],
        repo_root,
        nproc=2,
        timeout=300,
    )
    ckpt = load_checkpoint(out / "final.pt")
    assert ckpt["epoch"] == 2
    lines = (out / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 2  # rank 0 alone writes
    n = ckpt["data"]["train_clips"]
    assert n == 9
    seed = ckpt["train_config"]["seed"]
    for epoch in range(2):
        shards = [_shard(seed, n, rank, 2, epoch) for rank in (0, 1)]
        assert not set(shards[0]) & set(shards[1]), f"epoch {epoch}: a clip on both ranks"
        assert sorted(shards[0] + shards[1]) == list(range(n)), f"epoch {epoch}: not every clip"
        assert abs(len(shards[0]) - len(shards[1])) <= 1  # balanced: 5 and 4


def _shard(seed: int, n_clips: int, rank: int, world: int, epoch: int) -> list[int]:
    """The clip indices `rank` trains on in `epoch`, from the function the training loop uses."""
    from types import SimpleNamespace

    from train.train import epoch_order

    run = SimpleNamespace(
        cfg=SimpleNamespace(seed=seed), train_clips=[None] * n_clips, rank=rank, world=world
    )
    return epoch_order(run, epoch).tolist()
