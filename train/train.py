"""Training loop: AdamW + one-cycle, label smoothing, mixup, SpecAugment, random crop and gain.

Single process (CPU or CUDA) or DistributedDataParallel under `torchrun` (gloo on CPU, nccl on
CUDA). Checkpoints every epoch (`last.pt`, resumable) and writes metrics to `metrics.jsonl`.
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from . import data as D
from .checkpoint import code_version, load_checkpoint, save_checkpoint
from .evaluate import classification_metrics, predict, write_report
from .frontend import FrontendConfig
from .model import AudioClassifier, ModelConfig

log = logging.getLogger("train")


@dataclass
class TrainConfig:
    data_root: str = "../shared/esc50"  # ESC-50 layout: meta/esc50.csv + audio/
    folds: list[int] | None = None  # folds to use (None: all present)
    esc10: bool = False  # restrict to the ESC-10 subset
    val_fraction: float = 0.2  # per-class holdout, grouped by source recording (0: none)
    max_clips: int = 0  # cap on training clips, for smoke runs (0: no cap)
    epochs: int = 20  # full passes over the training clips (the shipped recipe)
    batch_size: int = 16  # per process
    lr: float = 2e-3  # peak learning rate of the one-cycle schedule
    weight_decay: float = 0.05  # AdamW decoupled weight decay
    warmup_pct: float = 0.2  # fraction of steps spent warming up
    label_smoothing: float = 0.1  # cross-entropy label smoothing
    mixup_alpha: float = 0.2  # Beta(a, a) mixing of waveforms (0: off)
    crop_seconds: float = 3.0  # random training crop; evaluation uses the full clip (0: full)
    gain_db: float = 6.0  # random gain +-dB before mixing (per-example norm removes it otherwise)
    freq_masks: int = 2  # SpecAugment frequency masks per example
    freq_mask_width: int = 16  # max mel bins per frequency mask
    time_masks: int = 2  # SpecAugment time masks per example
    time_mask_width: int = 40  # max frames per time mask
    seed: int = 0  # everything random derives from it
    device: str = "auto"  # auto | cpu | cuda
    amp: bool = True  # bf16 autocast for the CNN on CUDA (front-end stays FP32)
    out_dir: str = "runs/esc50"  # checkpoints, metrics.jsonl, reports
    resume: bool = False  # continue from out_dir/last.pt
    eval_every: int = 4  # epochs between validation passes (always after the last)
    stop_after: int = 0  # stop after this epoch, resumable (split a run across jobs; 0: off)
    model: ModelConfig = field(default_factory=ModelConfig)


# --------------------------------------------------------------------------- distributed


def dist_info() -> tuple[int, int]:
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":
        if not torch.cuda.is_available():
            raise SystemExit("--device cuda asked for, but torch sees no CUDA GPU")
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return torch.device(name)


def setup_distributed(device: torch.device) -> None:
    if dist_info()[1] > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        if device.type == "cuda":
            torch.cuda.set_device(device)


def all_reduce_sum(values: list[float], device: torch.device) -> list[float]:
    if not dist.is_initialized():
        return values
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


# --------------------------------------------------------------------------- augmentation


def random_crop(wave: torch.Tensor, n: int, gen: torch.Generator) -> torch.Tensor:
    """(B, N) -> (B, n), each row from its own random offset (a random time shift)."""
    if n >= wave.shape[1]:
        return wave
    starts = torch.randint(0, wave.shape[1] - n + 1, (wave.shape[0],), generator=gen)
    idx = starts.unsqueeze(1) + torch.arange(n).unsqueeze(0)
    return torch.gather(wave, 1, idx)


def spec_augment(x: torch.Tensor, cfg: TrainConfig, gen: torch.Generator) -> torch.Tensor:
    """Zero random mel bands and frame spans, independently per example. x: (B, 1, M, T)."""
    B, _, M, T = x.shape
    keep = torch.ones(B, 1, M, T, dtype=torch.bool)
    for n_masks, width, size, axis in ((cfg.freq_masks, cfg.freq_mask_width, M, 2),
                                       (cfg.time_masks, cfg.time_mask_width, T, 3)):  # fmt: skip
        for _ in range(n_masks):
            w = torch.randint(0, width + 1, (B,), generator=gen)
            start = (torch.rand(B, generator=gen) * (size - w)).long()
            pos = torch.arange(size).unsqueeze(0)  # 1, size
            band = (pos >= start.unsqueeze(1)) & (pos < (start + w).unsqueeze(1))  # B, size
            shape = (B, 1, size, 1) if axis == 2 else (B, 1, 1, size)
            keep &= ~band.view(shape)
    return x * keep.to(x.device)


def mix_batch(wave: torch.Tensor, y: torch.Tensor, cfg: TrainConfig, gen: torch.Generator):
    """Random gain, then mixup of waveforms. Returns (wave, y_a, y_b, lam)."""
    if cfg.gain_db > 0:
        db = (torch.rand(wave.shape[0], 1, generator=gen) * 2 - 1) * cfg.gain_db
        wave = wave * (10.0 ** (db / 20.0)).to(wave.device)
    if cfg.mixup_alpha <= 0:
        return wave, y, y, 1.0
    lam = float(np.random.default_rng(int(torch.randint(0, 2**31, (1,), generator=gen)))
                .beta(cfg.mixup_alpha, cfg.mixup_alpha))  # fmt: skip
    lam = max(lam, 1.0 - lam)  # the first clip dominates: its label stays the main one
    perm = torch.randperm(wave.shape[0], generator=gen).to(wave.device)
    return lam * wave + (1.0 - lam) * wave[perm], y, y[perm], lam


# --------------------------------------------------------------------------- loop


def seed_everything(seed: int) -> torch.Generator:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


def prepare_data(cfg: TrainConfig):
    sel = D.select(cfg.data_root, cfg.folds, cfg.esc10)
    train_clips, val_clips = (
        D.split_holdout(sel.clips, cfg.val_fraction, cfg.seed) if cfg.val_fraction > 0
        else (sel.clips, [])
    )  # fmt: skip
    if cfg.max_clips:
        train_clips = train_clips[: cfg.max_clips]
    data_info = {
        "root": str(cfg.data_root), **sel.describe(), "train_clips": len(train_clips),
        "val_clips": len(val_clips), "val_stems": [c.stem for c in val_clips],
        "train_folds": sorted({c.fold for c in train_clips}),
    }  # fmt: skip
    return sel.labels, train_clips, val_clips, data_info


def train(cfg: TrainConfig) -> Path:
    rank, world = dist_info()
    device = resolve_device(cfg.device)
    setup_distributed(device)
    gen = seed_everything(cfg.seed + rank)
    out_dir = Path(cfg.out_dir)
    labels, train_clips, val_clips, data_info = prepare_data(cfg)
    model_cfg = ModelConfig(**{**asdict(cfg.model), "n_classes": len(labels)})
    if rank == 0:
        out_dir.mkdir(parents=True, exist_ok=True)
        log.info("data: %s", {k: v for k, v in data_info.items() if k != "val_stems"})
    t0 = time.time()
    waves = torch.from_numpy(D.load_waveforms(train_clips))
    targets = torch.tensor([c.target for c in train_clips])
    val_waves = D.load_waveforms(val_clips) if val_clips and rank == 0 else None
    log.info("decoded %d clips in %.1fs", len(train_clips) + len(val_clips), time.time() - t0)

    torch.manual_seed(cfg.seed)  # identical initial weights on every rank
    model = AudioClassifier(model_cfg, FrontendConfig()).to(device)
    cnn: nn.Module = model.cnn
    if world > 1:
        cnn = nn.parallel.DistributedDataParallel(
            model.cnn, device_ids=[device.index] if device.type == "cuda" else None
        )
    steps_per_epoch = math.ceil(len(train_clips) / (cfg.batch_size * world))
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.OneCycleLR(
        opt, max_lr=cfg.lr, total_steps=cfg.epochs * steps_per_epoch, pct_start=cfg.warmup_pct
    )
    start_epoch = 0
    if cfg.resume and (out_dir / "last.pt").is_file():
        ckpt = load_checkpoint(out_dir / "last.pt")
        model.load_state_dict(ckpt["state_dict"])
        opt.load_state_dict(ckpt["optimizer"])
        sched.load_state_dict(ckpt["scheduler"])
        start_epoch = ckpt["epoch"]
        gen.manual_seed(cfg.seed + rank + 1000 * start_epoch)
        log.info("resumed from %s at epoch %d", out_dir / "last.pt", start_epoch)

    crop = int(cfg.crop_seconds * model.frontend.cfg.sample_rate) or waves.shape[1]
    use_amp = cfg.amp and device.type == "cuda"
    info = {"train_config": _jsonable(cfg), "data": data_info, "code_version": code_version()}
    metrics: dict = {}
    for epoch in range(start_epoch, cfg.epochs):
        model.train()
        t_epoch = time.time()
        order = torch.randperm(
            len(train_clips), generator=torch.Generator().manual_seed(cfg.seed * 1000 + epoch)
        )[rank::world]  # same permutation on every rank, sharded
        sums = [0.0, 0.0, 0.0]  # loss * n, correct, n
        bar = _progress(range(steps_per_epoch), f"epoch {epoch + 1}/{cfg.epochs}", rank)
        for step in bar:
            idx = order[step * cfg.batch_size : (step + 1) * cfg.batch_size]
            if len(idx) == 0:  # uneven shards: keep step counts equal across ranks
                idx = order[: cfg.batch_size]
            wave = random_crop(waves[idx], crop, gen).to(device)
            y = targets[idx].to(device)
            wave, y_a, y_b, lam = mix_batch(wave, y, cfg, gen)
            feats = spec_augment(model.frontend(wave), cfg, gen)  # FP32 front-end
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_amp):
                logits = cnn(feats)
            logits = logits.float()
            loss = lam * F.cross_entropy(logits, y_a, label_smoothing=cfg.label_smoothing) + (
                1 - lam
            ) * F.cross_entropy(logits, y_b, label_smoothing=cfg.label_smoothing)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            nn.utils.clip_grad_norm_(model.parameters(), 5.0)
            opt.step()
            sched.step()
            n = len(idx)
            sums[0] += loss.item() * n
            sums[1] += (logits.argmax(1) == y_a).sum().item()
            sums[2] += n
            if hasattr(bar, "set_postfix"):
                bar.set_postfix(loss=f"{sums[0] / sums[2]:.3f}", acc=f"{sums[1] / sums[2]:.3f}",
                                lr=f"{sched.get_last_lr()[0]:.2e}")  # fmt: skip
        loss_sum, correct, count = all_reduce_sum(sums, device)
        metrics = {"epoch": epoch + 1, "train_loss": loss_sum / count,
                   "train_acc": correct / count, "lr": sched.get_last_lr()[0],
                   "epoch_seconds": round(time.time() - t_epoch, 1)}  # fmt: skip
        last = epoch + 1 == cfg.epochs
        if rank == 0 and val_waves is not None and ((epoch + 1) % cfg.eval_every == 0 or last):
            metrics.update(_validate(model, val_waves, val_clips, labels, device))
        if rank == 0:
            with open(out_dir / "metrics.jsonl", "a") as f:
                f.write(json.dumps(metrics) + "\n")
            log.info("epoch %d: %s", epoch + 1, metrics)
            save_checkpoint(out_dir / "last.pt", model, labels, epoch=epoch + 1,
                            optimizer=opt.state_dict(), scheduler=sched.state_dict(),
                            metrics=metrics, **info)  # fmt: skip
        if cfg.stop_after and epoch + 1 == cfg.stop_after and not last:
            log.info("stopping after epoch %d as asked; continue with --resume", epoch + 1)
            break
    else:
        last = True
    if rank == 0 and last:
        _finish(model, out_dir, labels, val_waves, val_clips, info, metrics, device,
                time.time() - t0)  # fmt: skip
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
    return out_dir / "final.pt"


def _validate(model, val_waves, val_clips, labels, device) -> dict:
    logits = predict(model, val_waves, device=str(device))
    y = np.array([c.target for c in val_clips])
    m = classification_metrics(y, logits.argmax(1), labels)
    val_loss = F.cross_entropy(torch.from_numpy(logits), torch.from_numpy(y)).item()
    return {"val_loss": val_loss, "val_acc": m["accuracy"], "val_macro_f1": m["macro_f1"]}


def _finish(model, out_dir, labels, val_waves, val_clips, info, metrics, device, seconds):
    """Final checkpoint (no optimizer state) and, with a validation split, its report."""
    summary = {k: v for k, v in metrics.items() if k.startswith(("val_", "train_", "epoch"))}
    summary["wall_seconds"] = round(seconds, 1)
    summary["device"] = str(device) if device.type != "cuda" else torch.cuda.get_device_name()
    if val_waves is not None:
        logits = predict(model, val_waves, device=str(device))
        y = np.array([c.target for c in val_clips])
        report = classification_metrics(y, logits.argmax(1), labels)
        write_report(
            out_dir,
            "validation",
            report,
            labels,
            {"split": "held-out validation (grouped by source recording)"},
        )
        summary.update(val_acc=report["accuracy"], val_macro_f1=report["macro_f1"],
                       val_clips=report["n"])  # fmt: skip
    save_checkpoint(out_dir / "final.pt", model, labels, epoch=metrics.get("epoch"),
                    metrics=summary, **info)  # fmt: skip
    log.info("final checkpoint %s: %s", out_dir / "final.pt", summary)


def _progress(it, desc: str, rank: int):
    if rank != 0:
        return it
    try:
        from tqdm import tqdm
    except ImportError:
        return it
    return tqdm(it, desc=desc, dynamic_ncols=True, mininterval=2.0)


def _jsonable(cfg: TrainConfig) -> dict:
    d = asdict(cfg)
    d["model"] = cfg.model.to_dict()
    return d
