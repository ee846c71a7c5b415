"""Training end to end: smoke run, self-describing checkpoint, resume, evaluation, 2-process DDP."""

import json
import subprocess
import sys

import pytest
import torch

from loadtests.local import clean_env
from train import data as D
from train.checkpoint import (
    CheckpointError,
    load_checkpoint,
    model_from_checkpoint,
    release_checkpoint,
)
from train.model import count_parameters

TINY = ["--widths", "8,16", "--depths", "1,1"]


def train_args(data_root, out_dir, *extra: str, batch_size: int = 4) -> list[str]:
    """A short run on generated clips: 1-s crops, outputs in `out_dir`, then `extra` flags."""
    common = ["--batch-size", str(batch_size), "--crop-seconds", "1"]
    return ["--data-root", str(data_root), *common, "--out-dir", str(out_dir), *extra]


def run_train(args, cwd, nproc: int = 1, timeout: int = 180, **env: str):
    env = clean_env(OMP_NUM_THREADS="1", **env)
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
        train_args(synthetic_esc50, out, "--epochs", "1", "--val-fraction", "0.25"), repo_root
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
    args = train_args(synthetic_esc50, out, "--val-fraction", "0", "--mix", "none", "--lr", "0.01")
    args += TINY
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
        train_args(synthetic_esc50, out, "--epochs", "1", "--val-fraction", "0", *TINY), repo_root
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
    """torchrun, 2 CPU processes: the run completes, rank 0 alone writes, and the clips each rank
    trained on each epoch, as the training loop logged them (TRAIN_SHARD_LOG), are disjoint,
    balanced, reshuffled every epoch, and together cover every training clip."""
    out, shard_log = tmp_path / "ddp", tmp_path / "shards"
    shard_log.mkdir()
    args = ["--epochs", "2", "--val-fraction", "0.25", "--device", "cpu", *TINY]
    run_train(
        train_args(synthetic_esc50, out, *args, batch_size=2),
        repo_root,
        nproc=2,
        timeout=300,
        TRAIN_SHARD_LOG=str(shard_log),
    )
    ckpt = load_checkpoint(out / "final.pt")
    assert ckpt["epoch"] == 2
    lines = (out / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 2  # rank 0 alone writes
    val = set(ckpt["data"]["val_stems"])
    train_stems = {c.stem for c in D.select(synthetic_esc50).clips} - val
    assert len(train_stems) == ckpt["data"]["train_clips"] == 9
    logged = {
        rank: [json.loads(x) for x in (shard_log / f"rank{rank}.jsonl").read_text().splitlines()]
        for rank in (0, 1)
    }
    for rank, epochs in logged.items():
        assert [(e["epoch"], e["rank"]) for e in epochs] == [(1, rank), (2, rank)]
    for epoch in range(2):
        seen = [set(logged[rank][epoch]["stems"]) for rank in (0, 1)]
        assert not seen[0] & seen[1], f"epoch {epoch + 1}: a clip on both ranks"
        assert seen[0] | seen[1] == train_stems, f"epoch {epoch + 1}: not every clip"
        assert abs(len(seen[0]) - len(seen[1])) <= 1  # balanced: 5 and 4
    orders = [logged[0][e]["stems"] + logged[1][e]["stems"] for e in range(2)]
    assert orders[0] != orders[1], "the same order in both epochs"
