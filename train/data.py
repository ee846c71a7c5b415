"""ESC-50 on disk: `meta/esc50.csv` + `audio/`, clips matched by stem in any libsndfile format."""

from __future__ import annotations

import csv
import logging
import random
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from contract.audio import CLIP_SAMPLES, SAMPLE_RATE, read_audio
from contract.errors import AudioError

log = logging.getLogger(__name__)
# Where the dataset is unless told otherwise: the CLI defaults and the Makefile's DATA agree.
DEFAULT_DATA_ROOT = "../shared/esc50"
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
    src_file: str  # the group: clips of one source recording stay on one side of a split
    offset: int = 0  # first sample of this 5-s window in the decoded clip (a longer clip's)


@dataclass
class Selection:
    clips: list[Clip]
    labels: list[str]  # all classes of the metadata, index == target
    missing: list[str]  # stems listed in the CSV (and selected) but not on disk

    def describe(self) -> dict:
        folds = sorted({c.fold for c in self.clips})
        return {
            "clips": len(self.clips),
            "missing": len(self.missing),
            "folds": folds,
            "classes_present": len({c.target for c in self.clips}),
        }


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


def _nothing_selected(
    root: Path, rows: list[dict], on_disk: dict[str, Path], folds: list[int] | None, esc10: bool
) -> str:
    """Why nothing was selected, and which folds there are: a partial copy (such as the local
    one, folds 1-4) lacks folds that the metadata of the official download lists."""
    present = sorted(
        {
            int(r["fold"])
            for r in rows
            if Path(r["filename"]).stem in on_disk
            and (not esc10 or r["esc10"].strip().lower() == "true")
        }
    )
    subset = " ESC-10" if esc10 else ""
    if not present:
        return f"no{subset} clips of {root / 'meta' / 'esc50.csv'} are on disk in {root / 'audio'}"
    asked, listed = ", ".join(map(str, folds or [])), ", ".join(map(str, present))
    return (
        f"no{subset} clips of folds {asked} on disk in {root}: the folds there are {listed}. "
        f"Pass some of them (--folds {','.join(map(str, present))}; "
        "make evaluate FOLDS=...) or use the full dataset (python -m train download)"
    )


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
        clips.append(
            Clip(
                stem,
                on_disk[stem],
                int(r["fold"]),
                int(r["target"]),
                r["category"],
                is_esc10,
                r.get("src_file", stem),
            )
        )
    if not clips:
        raise DataError(_nothing_selected(root, rows, on_disk, folds, esc10))
    if missing:
        log.info(
            "%d of %d selected clips are not on disk (partial copy)",
            len(missing),
            len(missing) + len(clips),
        )
    return Selection(clips, labels, missing)


def fit_length(x: np.ndarray, n: int = CLIP_SAMPLES) -> np.ndarray:
    """Cut or zero-pad a 1-D waveform to exactly n samples."""
    if len(x) >= n:
        return x[:n]
    return np.pad(x, (0, n - len(x)))


def load_audio(path: str | Path, sample_rate: int = SAMPLE_RATE) -> np.ndarray:
    """Mono float32 at `sample_rate`, full length, by the reader the service uses too."""
    try:
        return read_audio(Path(path), sample_rate).waveform
    except AudioError as e:
        raise DataError(str(e)) from None  # the message starts with the path


def load_clip(
    path: str | Path, n: int = CLIP_SAMPLES, sample_rate: int = SAMPLE_RATE
) -> np.ndarray:
    return fit_length(load_audio(path, sample_rate), n)


def load_waveforms(
    clips: list[Clip], n: int = CLIP_SAMPLES, sample_rate: int = SAMPLE_RATE
) -> np.ndarray:
    """All clips decoded into one (len(clips), n) float32 array (651 clips ~ 0.6 GB)."""
    out = np.zeros((len(clips), n), dtype=np.float32)
    path, audio = None, np.zeros(0, np.float32)
    for i, c in enumerate(clips):
        if c.path != path:  # the windows of a long clip follow each other: decode it once
            path, audio = c.path, load_audio(c.path, sample_rate)
        out[i] = fit_length(audio[c.offset :], n)
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


def split_kfold(clips: list[Clip], k: int, index: int, seed: int) -> tuple[list[Clip], list[Clip]]:
    """Grouped, class-stratified K-fold: part `index` validates, the rest trains.

    Every clip of a source recording lands in one part; within a class, recordings go to the
    part that has fewest clips of that class so far (random order, seeded), so that each part
    holds about 1/k of every class and each clip is validated exactly once across the k runs.
    """
    if not 0 <= index < k or k < 2:
        raise DataError(f"cv index {index} is not in 0..{k - 1} (k={k})")
    rng = random.Random(seed)
    by_class: dict[int, dict[str, list[Clip]]] = defaultdict(lambda: defaultdict(list))
    for c in clips:
        by_class[c.target][c.src_file].append(c)
    part_of: dict[str, int] = {}
    for target in sorted(by_class):
        groups = sorted(by_class[target].values(), key=lambda g: g[0].stem)
        rng.shuffle(groups)
        counts = [0] * k
        offset = rng.randrange(k)  # classes start filling at different parts: balanced sizes
        for g in sorted(groups, key=len, reverse=True):
            part = min(range(k), key=lambda p: (counts[p], (p - offset) % k))
            counts[part] += len(g)
            for c in g:
                part_of[c.stem] = part
    train = [c for c in clips if part_of[c.stem] != index]
    val = [c for c in clips if part_of[c.stem] == index]
    return train, val
