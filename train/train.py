"""Training: AdamW + one-cycle, between-class mixing, energy-aware crops, time stretch,
SpecAugment and an exponential moving average (EMA) of the weights, which is what ships.

Single process (CPU or CUDA) or DistributedDataParallel under `torchrun` (gloo on CPU, nccl on
CUDA). The training clips live on the training device and are augmented there, so a GPU is not
starved by a Python data loader. `setup` builds a run, `train_epoch` runs one pass, `finish`
writes the final checkpoint and its validation outputs; `train` chains them with a checkpoint
every epoch (`last.pt`, resumable) and metrics in `metrics.jsonl`.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import os
import random
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from contract.machine import cpu_flags, cpu_model

from . import data as D
from .augment import AugmentConfig, Augmenter
from .checkpoint import code_version, load_checkpoint, save_checkpoint
from .distill import Teacher, distill_loss, load_teacher, teacher_paths
from .evaluate import classification_metrics, predict, write_report
from .folder_data import select_source, splits_for
from .frontend import FrontendConfig
from .model import AudioClassifier, ModelConfig

log = logging.getLogger("train")


@dataclass
class TrainConfig:
    data_root: str = D.DEFAULT_DATA_ROOT  # ESC-50 layout: meta/esc50.csv + audio/
    folds: list[int] | None = None  # folds to use (None: all present)
    esc10: bool = False  # restrict to the ESC-10 subset
    val_fraction: float = 0.2  # per-class holdout, grouped by source recording (0: none)
    cv_folds: int = 0  # grouped K-fold instead: validate on part `cv_index` of `cv_folds`
    cv_index: int = 0  # which of the cv_folds parts is the validation set
    max_clips: int = 0  # cap on training clips, for smoke runs (0: no cap)
    epochs: int = 306  # full passes over the training clips (the shipped model's schedule)
    batch_size: int = 64  # per process
    lr: float = 2e-3  # peak learning rate of the one-cycle schedule
    weight_decay: float = 0.05  # AdamW decoupled weight decay
    warmup_pct: float = 0.1  # fraction of steps spent warming up
    label_smoothing: float = 0.0  # cross-entropy label smoothing (on top of the mixed labels)
    mix: str = "bc"  # bc (between-class, loudness-aware) | mixup | none
    mix_prob: float = 1.0  # fraction of examples mixed with another clip
    mixup_alpha: float = 0.4  # Beta(a, a) for mix=mixup
    crop_seconds: float = 0.0  # training crop, placed by energy (0: whole clip, shifted)
    crop_energy: float = 0.5  # a crop holds >= this fraction of the clip's best window energy
    shift_seconds: float = 0.5  # max random shift of whole-clip crops
    stretch: float = 0.1  # time stretch / pitch shift factor in [1 - s, 1 + s] (0: off)
    freq_masks: int = 2  # SpecAugment frequency masks per example
    freq_mask_width: int = 16  # max mel bins per frequency mask
    time_masks: int = 2  # SpecAugment time masks per example
    time_mask_width: int = 40  # max frames per time mask (for a 5-s input; scaled to the crop)
    ema_decay: float = 0.998  # EMA of the weights, evaluated and shipped (0: off)
    seed: int = 0  # everything random derives from it
    split_seed: int = -1  # seed of the validation split (-1: `seed`); fixed, runs of several
    # seeds hold out the same clips, so that they can teach each other's folds honestly
    device: str = "auto"  # auto | cpu | cuda
    amp: str = "auto"  # bf16 autocast of the CNN: auto (CUDA; CPU with AVX-512 BF16/AMX) | off
    channels_last: bool = True  # NHWC activations for the CNN on CUDA (faster convolutions)
    threads: int = 0  # torch intra-op threads on CPU (0: torch's default)
    out_dir: str = "runs/esc50"  # checkpoints, metrics.jsonl, reports
    resume: bool = False  # continue from out_dir/last.pt
    eval_every: int = 4  # epochs between validation passes (always after the last; 0: last)
    save_every: int = 1  # epochs between resumable checkpoints (always after the last)
    stop_after: int = 0  # stop after this epoch, resumable (split a run across jobs; 0: off)
    teachers: list[str] = field(default_factory=list)  # checkpoints whose mean logits teach
    teachers_dir: list[str] = field(default_factory=list)  # folders: every final.pt teaches
    distill_alpha: float = 0.5  # weight of the teacher's KL term (1 - alpha: the labels)
    distill_temperature: float = 2.0  # softmax temperature of the KL term
    init_from: str = ""  # start from this checkpoint's front-end + CNN, a new classifier head
    freeze_stages: int = 0  # with init_from: the stem and this many first stages stay fixed
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


# --------------------------------------------------------------------------- weights average


class WeightEMA:
    """Exponential moving average of every parameter and buffer (BatchNorm statistics too)."""

    def __init__(self, model: nn.Module, decay: float):
        self.decay = decay
        self.model = copy.deepcopy(model).eval()
        for p in self.model.parameters():
            p.requires_grad_(False)

    @torch.no_grad()
    def update(self, model: nn.Module, step: int) -> None:
        # Warm-up: early on the average follows the weights closely instead of the random init.
        d = min(self.decay, (1 + step) / (10 + step))
        for ema, cur in zip(
            self.model.state_dict().values(), model.state_dict().values(), strict=True
        ):
            if ema.is_floating_point():
                ema.lerp_(cur, 1.0 - d)
            else:
                ema.copy_(cur)


# --------------------------------------------------------------------------- setup / epoch / finish


@dataclass
class Run:
    """Everything one training run holds between epochs."""

    cfg: TrainConfig
    device: torch.device
    rank: int
    world: int
    out_dir: Path
    labels: list[str]
    train_clips: list[D.Clip]
    val_clips: list[D.Clip]
    val_waves: np.ndarray | None
    model: AudioClassifier
    cnn: nn.Module  # the CNN as trained (DDP-wrapped under torchrun)
    ema: WeightEMA | None
    opt: torch.optim.Optimizer
    sched: torch.optim.lr_scheduler.LRScheduler
    aug: Augmenter
    gen: torch.Generator
    steps_per_epoch: int
    start_epoch: int
    info: dict
    t0: float
    metrics: dict = field(default_factory=dict)
    amp: torch.dtype | None = None  # autocast dtype of the CNN (None: FP32)
    teacher: Teacher | None = None  # distillation: the ensemble whose logits the CNN learns
    last_kl: float = 0.0  # the last step's KL to the teacher (0 without one)
    on_step: Callable[[], None] | None = None  # called after every step (a caller's progress)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def prepare_data(cfg: TrainConfig):
    sel = select_source(cfg.data_root, cfg.folds, cfg.esc10)  # ESC-50 or a labelled folder
    split_holdout, split_kfold = splits_for(sel)
    split_seed = cfg.seed if cfg.split_seed < 0 else cfg.split_seed
    if cfg.cv_folds:
        train_clips, val_clips = split_kfold(sel.clips, cfg.cv_folds, cfg.cv_index, split_seed)
    elif cfg.val_fraction > 0:
        train_clips, val_clips = split_holdout(sel.clips, cfg.val_fraction, split_seed)
    else:
        train_clips, val_clips = sel.clips, []
    if cfg.max_clips:
        train_clips = train_clips[: cfg.max_clips]
    data_info = {
        "root": str(cfg.data_root),
        **sel.describe(),
        "train_clips": len(train_clips),
        "val_clips": len(val_clips),
        "val_stems": [c.stem for c in val_clips],
        "train_stems": [c.stem for c in train_clips],  # what a student may not validate on
        "split_seed": split_seed,
        "train_folds": sorted({c.fold for c in train_clips}),
        "train_esc10_clips": sum(c.esc10 for c in train_clips),
    }
    return sel.labels, train_clips, val_clips, data_info


def augment_config(cfg: TrainConfig, sample_rate: int) -> AugmentConfig:
    crop = int(cfg.crop_seconds * sample_rate) if cfg.crop_seconds > 0 else 1 << 40
    return AugmentConfig(
        crop_samples=crop,
        shift_samples=int(cfg.shift_seconds * sample_rate),
        crop_energy=cfg.crop_energy,
        stretch=cfg.stretch,
        mix=cfg.mix,
        mix_prob=cfg.mix_prob,
        mixup_alpha=cfg.mixup_alpha,
        freq_masks=cfg.freq_masks,
        freq_mask_width=cfg.freq_mask_width,
        time_masks=cfg.time_masks,
        time_mask_width=cfg.time_mask_width,
    )


def setup(cfg: TrainConfig) -> Run:
    rank, world = dist_info()
    device = resolve_device(cfg.device)
    setup_distributed(device)
    if cfg.threads and device.type == "cpu":
        torch.set_num_threads(cfg.threads)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed input shapes: pick the fastest kernels
        # The FP32 front-end must be FP32 on a GPU too (TF32 keeps 10 mantissa bits); the CNN
        # runs under bf16 autocast, which these flags do not touch.
        torch.backends.cudnn.allow_tf32 = False
        torch.backends.cuda.matmul.allow_tf32 = False
    seed_everything(cfg.seed)  # identical initial weights on every rank
    out_dir = Path(cfg.out_dir)
    labels, train_clips, val_clips, data_info = prepare_data(cfg)
    if rank == 0:
        out_dir.mkdir(parents=True, exist_ok=True)
        log.info("data: %s", {k: v for k, v in data_info.items() if not k.endswith("_stems")})
    t0 = time.time()
    waves = torch.from_numpy(D.load_waveforms(train_clips)).to(device)
    targets = torch.tensor([c.target for c in train_clips])
    val_waves = D.load_waveforms(val_clips) if val_clips and rank == 0 else None
    log.info("decoded %d clips in %.1fs", len(train_clips) + len(val_clips), time.time() - t0)

    model_cfg = ModelConfig(**{**asdict(cfg.model), "n_classes": len(labels)})
    model = AudioClassifier(model_cfg, FrontendConfig()).to(device)
    if cfg.init_from:
        from .finetune import start_from  # finetune imports this module

        info_init = start_from(model, cfg.init_from, labels, cfg.freeze_stages)
    if cfg.channels_last and device.type == "cuda":
        model.cnn.to(memory_format=torch.channels_last)
    cnn: nn.Module = model.cnn
    if world > 1:
        cnn = nn.parallel.DistributedDataParallel(
            model.cnn, device_ids=[device.index] if device.type == "cuda" else None
        )
    ema = WeightEMA(model, cfg.ema_decay) if cfg.ema_decay > 0 else None
    steps_per_epoch = math.ceil(len(train_clips) / (cfg.batch_size * world))
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    total_steps = cfg.epochs * steps_per_epoch
    # OneCycleLR divides by the warm-up's length (pct_start * total_steps - 1 steps) and by the
    # rest's: >= 2 warm-up steps where there are enough, and a 2-step run splits 1.5 / 0.5
    # (0.5 / 0.5 would make the warm-up 0 steps long: a ZeroDivisionError)
    pct_start = min(0.5, max(cfg.warmup_pct, 2.5 / total_steps)) if total_steps != 2 else 0.75
    sched = torch.optim.lr_scheduler.OneCycleLR(
        opt, max_lr=cfg.lr, total_steps=total_steps, pct_start=pct_start
    )
    start_epoch, metrics = 0, {}
    if cfg.resume and (out_dir / "last.pt").is_file():
        ckpt = load_checkpoint(out_dir / "last.pt")
        model.load_state_dict(ckpt["state_dict"])
        if ema is not None and "ema_state_dict" in ckpt:
            ema.model.load_state_dict(ckpt["ema_state_dict"])
        opt.load_state_dict(ckpt["optimizer"])
        sched.load_state_dict(ckpt["scheduler"])
        start_epoch, metrics = ckpt["epoch"], ckpt.get("metrics") or {}
        log.info("resumed from %s at epoch %d", out_dir / "last.pt", start_epoch)
    gen = torch.Generator(device=device)
    aug = Augmenter(
        waves, targets, len(labels), augment_config(cfg, FrontendConfig().sample_rate), gen
    )
    info = {"train_config": _jsonable(cfg), "data": data_info, "code_version": code_version()}
    if cfg.init_from:
        info["init_from"] = info_init
    amp = autocast_dtype(cfg.amp, device)
    info["amp"] = str(amp).removeprefix("torch.") if amp else "fp32"
    teacher = setup_teacher(cfg, labels, model, val_clips, device)
    if teacher is not None:
        info["distillation"] = {
            "teachers": teacher.sources,
            "alpha": cfg.distill_alpha,
            "temperature": cfg.distill_temperature,
        }
    return Run(
        cfg,
        device,
        rank,
        world,
        out_dir,
        labels,
        train_clips,
        val_clips,
        val_waves,
        model,
        cnn,
        ema,
        opt,
        sched,
        aug,
        gen,
        steps_per_epoch,
        start_epoch,
        info,
        time.time(),
        metrics,
        amp,
        teacher,
    )


def autocast_dtype(mode: str, device: torch.device) -> torch.dtype | None:
    """bf16 where the hardware runs it natively (auto), always (bf16) or never (off)."""
    if mode not in ("auto", "bf16", "off"):
        raise SystemExit(f"--amp must be auto, bf16 or off, not {mode!r}")
    native = device.type == "cuda" and torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        native = bool(cpu_bf16_flags())
    if mode == "off" or (mode == "auto" and not native):
        if mode == "auto":
            log.info("amp: fp32 (no native bf16 on %s)", device_name(device))
        return None
    if not native:
        log.warning("amp: bf16 forced on %s without native bf16: emulated, slow", device)
    where = f"CPU flags {cpu_bf16_flags()}" if device.type == "cpu" else device_name(device)
    log.info("amp: bf16 autocast of the CNN (%s)", where)
    return torch.bfloat16


def cpu_bf16_flags() -> list[str]:
    """The CPU's native bf16 instruction sets (AVX-512 BF16, AMX) named in /proc/cpuinfo."""
    return [x for x in ("avx512_bf16", "amx_bf16") if x in cpu_flags()]


def setup_teacher(
    cfg: TrainConfig,
    labels: list[str],
    model: AudioClassifier,
    val_clips: list[D.Clip],
    device: torch.device,
) -> Teacher | None:
    """The distillation teacher asked for, checked against this run's validation clips."""
    paths = teacher_paths(cfg.teachers, cfg.teachers_dir)
    if not paths:
        return None
    all_stems = [c.stem for c in D.select(cfg.data_root, cfg.folds, cfg.esc10).clips]
    teacher = load_teacher(
        paths,
        labels,
        model.frontend.cfg.to_dict(),
        [c.stem for c in val_clips],
        all_stems,
        device,
    )
    if cfg.channels_last and device.type == "cuda":
        teacher.to(memory_format=torch.channels_last)
    log.info("distilling from %d teachers: %s", len(paths), [str(p) for p in paths])
    return teacher


def train_step(run: Run, idx: torch.Tensor) -> tuple[float, int]:
    """One optimiser step on the clips `idx`; returns (loss, correct w.r.t. the main label).
    With a teacher, `run.last_kl` holds the step's KL to it (before the alpha weighting)."""
    cfg, model = run.cfg, run.model
    idx = idx.to(run.device)
    y = run.aug.targets[idx]
    wave, target = run.aug.mix(run.aug.waveforms(idx), y)
    with torch.no_grad():  # the front-end has no weights to learn: keep it out of autograd
        feats = run.aug.spec_augment(model.frontend(wave))  # FP32
    if cfg.channels_last and run.device.type == "cuda":
        feats = feats.contiguous(memory_format=torch.channels_last)
    with torch.autocast(run.device.type, dtype=run.amp or torch.bfloat16, enabled=bool(run.amp)):
        logits = run.cnn(feats)
        teacher_logits = run.teacher(feats) if run.teacher is not None else None  # same batch
    logits = logits.float()
    if cfg.label_smoothing:
        target = target * (1 - cfg.label_smoothing) + cfg.label_smoothing / target.shape[1]
    if teacher_logits is None:
        loss = -(target * F.log_softmax(logits, 1)).sum(1).mean()
    else:
        loss, kl = distill_loss(
            logits, teacher_logits, target, cfg.distill_alpha, cfg.distill_temperature
        )
        run.last_kl = kl.item()
    run.opt.zero_grad(set_to_none=True)
    loss.backward()
    nn.utils.clip_grad_norm_(model.parameters(), 5.0)
    run.opt.step()
    run.sched.step()
    if run.ema is not None:
        run.ema.update(model, run.sched.last_epoch)
    return loss.item(), int((logits.argmax(1) == target.argmax(1)).sum().item())


def epoch_order(run: Run, epoch: int) -> torch.Tensor:
    """This rank's clip order for an epoch: one permutation shared by all ranks, sharded."""
    g = torch.Generator().manual_seed(run.cfg.seed * 1000 + epoch)
    return torch.randperm(len(run.train_clips), generator=g)[run.rank :: run.world]


def log_shard(run: Run, epoch: int, trained: list[int]) -> None:
    """With TRAIN_SHARD_LOG=<folder>, append the stems this rank trained on this epoch to
    <folder>/rank<r>.jsonl: the DDP test observes the shards instead of recomputing them."""
    folder = os.environ.get("TRAIN_SHARD_LOG")
    if folder:
        stems = [run.train_clips[i].stem for i in trained]
        with open(Path(folder) / f"rank{run.rank}.jsonl", "a") as f:
            f.write(json.dumps({"epoch": epoch + 1, "rank": run.rank, "stems": stems}) + "\n")


def train_epoch(run: Run, epoch: int) -> dict:
    cfg = run.cfg
    run.model.train()
    run.gen.manual_seed(cfg.seed * 1_000_003 + 7919 * run.rank + epoch)  # resumable randomness
    t_epoch = time.time()
    order = epoch_order(run, epoch)
    sums = [0.0, 0.0, 0.0, 0.0]  # loss * n, correct, n, KL to the teacher * n
    bar = _progress(range(run.steps_per_epoch), f"epoch {epoch + 1}/{cfg.epochs}", run.rank)
    trained: list[int] = []  # the clips this rank's steps took, in order (TRAIN_SHARD_LOG)
    for step in bar:
        idx = order[step * cfg.batch_size : (step + 1) * cfg.batch_size]
        if len(idx) == 0:  # uneven shards: keep step counts equal across ranks
            idx = order[: cfg.batch_size]
        trained += idx.tolist()
        loss, correct = train_step(run, idx)
        if run.on_step is not None:
            run.on_step()
        sums[0] += loss * len(idx)
        sums[1] += correct
        sums[2] += len(idx)
        sums[3] += run.last_kl * len(idx)
        if hasattr(bar, "set_postfix"):
            bar.set_postfix(loss=f"{sums[0] / sums[2]:.3f}", lr=f"{run.sched.get_last_lr()[0]:.2e}")
    log_shard(run, epoch, trained)
    loss_sum, correct, count, kl_sum = all_reduce_sum(sums, run.device)
    metrics = {
        "epoch": epoch + 1,
        "train_loss": loss_sum / count,
        "train_acc": correct / count,
        "lr": run.sched.get_last_lr()[0],
        **({"train_kl_to_teacher": kl_sum / count} if run.teacher is not None else {}),
        "epoch_seconds": round(time.time() - t_epoch, 2),
    }
    last = epoch + 1 == cfg.epochs
    if (
        run.rank == 0
        and run.val_waves is not None
        and (last or (cfg.eval_every and (epoch + 1) % cfg.eval_every == 0))
    ):
        metrics.update(_validate(run))
    return metrics


def finish(run: Run) -> Path:
    """Final checkpoint (the EMA weights when averaging; no optimizer state), validation report
    and the validation logits (for pooling across folds and fitting a temperature)."""
    summary = {k: v for k, v in run.metrics.items() if k.startswith(("val_", "train_", "epoch"))}
    summary["amp"] = run.info["amp"]
    summary["wall_seconds"] = round(time.time() - run.t0, 1)
    summary["device"] = device_name(run.device)
    shipped = run.ema.model if run.ema is not None else run.model
    if run.val_waves is not None:
        y = np.array([c.target for c in run.val_clips])
        outputs = {"raw": predict(run.model, run.val_waves, device=str(run.device))}
        if run.ema is not None:
            outputs["ema"] = predict(run.ema.model, run.val_waves, device=str(run.device))
        logits = outputs["ema" if run.ema is not None else "raw"]
        np.savez(
            run.out_dir / "val_logits.npz",
            stems=np.array([c.stem for c in run.val_clips]),
            targets=y,
            **{f"logits_{k}": v for k, v in outputs.items()},
        )
        report = classification_metrics(y, logits.argmax(1), run.labels)
        write_report(
            run.out_dir,
            "validation",
            report,
            run.labels,
            {
                "split": "held-out validation (grouped by source recording)",
                "weights": "ema" if run.ema is not None else "raw",
            },
        )
        summary.update(
            val_acc=report["accuracy"], val_macro_f1=report["macro_f1"], val_clips=report["n"]
        )
    final = run.out_dir / "final.pt"
    save_checkpoint(
        final,
        shipped,
        run.labels,
        epoch=run.metrics.get("epoch"),
        metrics=summary,
        weights="ema" if run.ema is not None else "raw",
        **run.info,
    )
    log.info("final checkpoint %s: %s", final, summary)
    return final


def train(cfg: TrainConfig) -> Path:
    run = setup(cfg)
    last = run.start_epoch >= cfg.epochs
    for epoch in range(run.start_epoch, cfg.epochs):
        run.metrics = train_epoch(run, epoch)
        last = epoch + 1 == cfg.epochs
        stopping = cfg.stop_after and epoch + 1 == cfg.stop_after and not last
        save = last or stopping or (epoch + 1) % max(cfg.save_every, 1) == 0
        if run.rank == 0:
            with open(run.out_dir / "metrics.jsonl", "a") as f:
                f.write(json.dumps(run.metrics) + "\n")
            log.info("epoch %d: %s", epoch + 1, run.metrics)
        if run.rank == 0 and save:
            extra = {"ema_state_dict": run.ema.model.state_dict()} if run.ema else {}
            save_checkpoint(
                run.out_dir / "last.pt",
                run.model,
                run.labels,
                epoch=epoch + 1,
                optimizer=run.opt.state_dict(),
                scheduler=run.sched.state_dict(),
                metrics=run.metrics,
                **extra,
                **run.info,
            )
        if stopping:
            log.info("stopping after epoch %d as asked; continue with --resume", epoch + 1)
            break
    if run.rank == 0 and last:
        finish(run)
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
    return run.out_dir / "final.pt"


def measure_throughput(
    cfg: TrainConfig, steps: int = 20, warmup: int = 3, ready=lambda: None
) -> dict:
    """Training clips per second of this config on this machine (real steps, weights thrown
    away). What `python -m train throughput` prints and what a time budget plans from.
    `ready` is called after the warm-up and before the timing (a barrier between processes
    that will share the device, so that each is timed while all of them run)."""
    run = setup(cfg)
    order = torch.arange(len(run.train_clips)).repeat(
        math.ceil((steps + warmup) * cfg.batch_size / len(run.train_clips))
    )
    run.model.train()

    def batch(i):
        return order[i * cfg.batch_size : (i + 1) * cfg.batch_size]

    for i in range(warmup):
        train_step(run, batch(i))
    _sync(run.device)
    ready()
    t = time.perf_counter()
    for i in range(warmup, warmup + steps):
        train_step(run, batch(i))
    _sync(run.device)
    seconds = time.perf_counter() - t
    return {
        "clips_per_s": steps * cfg.batch_size / seconds,
        "step_s": seconds / steps,
        "device": device_name(run.device),
        "threads": torch.get_num_threads(),
        "crop_seconds": cfg.crop_seconds,
        "batch_size": cfg.batch_size,
        "channels_last": cfg.channels_last,
        "amp": run.info["amp"],
    }


def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_model()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _validate(run: Run) -> dict:
    model = run.ema.model if run.ema is not None else run.model
    logits = predict(model, run.val_waves, device=str(run.device))
    y = np.array([c.target for c in run.val_clips])
    m = classification_metrics(y, logits.argmax(1), run.labels)
    val_loss = F.cross_entropy(torch.from_numpy(logits), torch.from_numpy(y)).item()
    return {"val_loss": val_loss, "val_acc": m["accuracy"], "val_macro_f1": m["macro_f1"]}


def _progress(it, desc: str, rank: int):
    if rank != 0 or os.environ.get("TRAIN_PROGRESS", "1") != "1":
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
