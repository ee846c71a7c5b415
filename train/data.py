"""ESC-50 on disk: `meta/esc50.csv` + `audio/`, clips matched by stem in any libsndfile format."""

from __future__ import annotations

import csv
import logging
import random
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import soundfile as sf
import soxr

from .frontend import CLIP_SAMPLES, SAMPLE_RATE

log = logging.getLogger(__name__)
AUDIO_SUFFIXES = {".wav", ".flac", ".ogg", ".oga", ".aiff", ".aif", ".mp3", ".opus"}


class DataError(ValueError):
    """The dataset folder, its metadata or one of its clips is unusable."""


@dataclass(frozen=True)
class Clip:
    stem: str  # "1-100032-A-0"
    path: Path
    fold: int
    target: int
    category: str
    esc10: bool
    src_file: str


@dataclass
class Selection:
    clips: list[Clip]
    labels: list[str]  # all classes of the metadata, index == target
    missing: list[str]  # stems listed in the CSV (and selected) but not on disk

    def describe(self) -> dict:
        folds = sorted({c.fold for c in self.clips})
        return {"clips": len(self.clips), "missing": len(self.missing), "folds": folds,
                "classes_present": len({c.target for c in self.clips})}  # fmt: skip


def read_metadata(root: Path) -> list[dict]:
    csv_path = root / "meta" / "esc50.csv"
    if not root.is_dir():
        raise DataError(f"dataset folder {root} does not exist")
    if not csv_path.is_file():
        raise DataError(f"{csv_path} not found: expected the ESC-50 layout meta/esc50.csv + audio/")
    with open(csv_path, newline="") as f:
        rows = list(csv.DictReader(f))
    need = {"filename", "fold", "target", "category", "esc10"}
    if not rows or not need <= set(rows[0]):
        raise DataError(f"{csv_path} lacks columns {sorted(need - set(rows[0] if rows else []))}")
    return rows


def label_names(rows: list[dict]) -> list[str]:
    by_target = {int(r["target"]): r["category"] for r in rows}
    return [by_target.get(i, f"class_{i}") for i in range(max(by_target) + 1)]


def index_audio(audio_dir: Path) -> dict[str, Path]:
    if not audio_dir.is_dir():
        raise DataError(f"audio folder {audio_dir} does not exist")
    return {p.stem: p for p in sorted(audio_dir.iterdir()) if p.suffix.lower() in AUDIO_SUFFIXES}


def select(root: str | Path, folds: list[int] | None = None, esc10: bool = False) -> Selection:
    """Clips of the chosen folds (all when None) present on disk; missing ones are counted."""
    root = Path(root)
    rows = read_metadata(root)
    labels = label_names(rows)
    on_disk = index_audio(root / "audio")
    clips, missing = [], []
    for r in rows:
        if folds is not None and int(r["fold"]) not in folds:
            continue
        is_esc10 = r["esc10"].strip().lower() == "true"
        if esc10 and not is_esc10:
            continue
        stem = Path(r["filename"]).stem
        if stem not in on_disk:
            missing.append(stem)
            continue
        clips.append(Clip(stem, on_disk[stem], int(r["fold"]), int(r["target"]), r["category"],
                          is_esc10, r.get("src_file", stem)))  # fmt: skip
    if not clips:
        raise DataError(f"no clips selected in {root} (folds={folds}, esc10={esc10})")
    if missing:
        log.info("%d of %d selected clips are not on disk (partial copy)", len(missing),
                 len(missing) + len(clips))  # fmt: skip
    return Selection(clips, labels, missing)


def fit_length(x: np.ndarray, n: int = CLIP_SAMPLES) -> np.ndarray:
    """Cut or zero-pad a 1-D waveform to exactly n samples."""
    if len(x) >= n:
        return x[:n]
    return np.pad(x, (0, n - len(x)))


def load_audio(path: str | Path, sample_rate: int = SAMPLE_RATE) -> np.ndarray:
    """Decode any libsndfile format to mono float32 at `sample_rate` (full length)."""
    try:
        x, sr = sf.read(str(path), dtype="float32", always_2d=True)
    except (sf.LibsndfileError, RuntimeError, OSError) as e:
        raise DataError(f"cannot decode {path}: {e}") from None
    x = x.mean(axis=1)
    if sr != sample_rate:
        x = soxr.resample(x, sr, sample_rate, quality="HQ").astype(np.float32)
    if not np.isfinite(x).all():
        raise DataError(f"{path} contains NaN or Inf samples")
    return x


def load_clip(
    path: str | Path, n: int = CLIP_SAMPLES, sample_rate: int = SAMPLE_RATE
) -> np.ndarray:
    return fit_length(load_audio(path, sample_rate), n)


def load_waveforms(clips: list[Clip], n: int = CLIP_SAMPLES) -> np.ndarray:
    """All clips decoded into one (len(clips), n) float32 array (651 clips ~ 0.6 GB)."""
    out = np.zeros((len(clips), n), dtype=np.float32)
    for i, c in enumerate(clips):
        out[i] = load_clip(c.path, n)
    return out


def split_holdout(clips: list[Clip], fraction: float, seed: int) -> tuple[list[Clip], list[Clip]]:
    """Per-class split that keeps every clip of a source recording on one side (no leakage)."""
    rng = random.Random(seed)
    by_class: dict[int, dict[str, list[Clip]]] = defaultdict(lambda: defaultdict(list))
    for c in clips:
        by_class[c.target][c.src_file].append(c)
    train, val = [], []
    for target in sorted(by_class):
        groups = sorted(by_class[target].values(), key=lambda g: g[0].stem)
        rng.shuffle(groups)
        n_total = sum(len(g) for g in groups)
        want = max(1, round(fraction * n_total))
        chosen, taken = [], 0
        for g in groups:
            if taken + len(g) <= want:
                chosen.append(g)
                taken += len(g)
        if not chosen and len(groups) > 1:  # every group is bigger than `want`: take the smallest
            smallest = min(groups, key=len)
            chosen = [smallest] if len(smallest) <= n_total // 2 else []
        for g in groups:
            (val if any(g is c for c in chosen) else train).extend(g)
    return train, val
