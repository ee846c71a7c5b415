"""A folder of labelled clips, the layout people already have, as training and evaluation data.

Two layouts (`select_folder`):
- `DATA/<label>/<file>`: the folder names the label (files in sub-folders of it too); every
  file is its own group.
- `DATA/labels.csv` with columns `filename,label[,group][,fold]` (file names relative to DATA):
  when present it is the list of clips, and folders are not looked at. A `group` keeps related
  clips (one recording, speaker, device or session) on one side of every split, as ESC-50's
  source ids do; a `fold` fixes the parts of a k-fold estimate.
Any format and rate the one reader reads (contract.audio.read_audio; mixed rates and channel
counts are fine: it downmixes and resamples).

Length, decided like the service decides it (service/audio.py `window_starts`, hop 2.5 s): the
model hears 5-s windows. A clip up to 5.1 s is one window, zero-padded when shorter (cut when
longer); a longer clip gives a window every 2.5 s plus one aligned to its end. Every window
trains as an example of its clip's label and group (so one recording never straddles a split),
and a clip is scored by the mean of its windows' probabilities, which is the service's answer.

Every problem of the folder is found before anything trains and reported at once, in one
DataError: a class with one clip (or one group), unreadable files (each listed), label names
that are not valid names, labels.csv rows naming missing files, a group split across folds.

`select_source` takes an ESC-50 folder or a labelled folder alike: `python -m train`,
`python -m train evaluate` and `python -m train finetune` all read data through it.
"""

from __future__ import annotations

import csv
import logging
import os
import random
import re
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from contract.audio import CLIP_SAMPLES, SAMPLE_RATE, read_audio
from contract.errors import AudioError

from . import data as D

log = logging.getLogger(__name__)

LABELS_CSV = "labels.csv"
# A label or model name: it becomes a JSON key, a Prometheus label value, a folder and part of
# a URL (/v1/models/<name>/classify), so ASCII letters, digits, "_", "-" and "." only.
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
NAME_RULE = "1-64 ASCII letters, digits, '_', '-' or '.', starting with a letter or digit"
HOP_SECONDS = 2.5  # between windows of a longer clip: the service's default (window_hop_s)
SLACK_SECONDS = 0.1  # up to clip + this is one window (service.audio.SINGLE_WINDOW_SLACK_S)
MAX_LISTED = 20  # problems listed per kind; the rest are counted


@dataclass
class FolderSelection(D.Selection):
    """The clips of a labelled folder: one `Clip` per 5-s window (`offset` says where)."""

    root: Path = Path(".")
    layout: str = "folders"  # "folders" (DATA/<label>/...) or "labels.csv"
    fixed_folds: bool = False  # labels.csv named a fold for every clip
    files: int = 0  # audio files (a long one gives several windows)
    padded: int = 0  # files shorter than 5 s, zero-padded
    windowed: int = 0  # files longer than 5.1 s, cut into windows
    seconds: float = 0.0  # total audio
    notes: list[str] = field(default_factory=list)  # what was ignored, said once

    def describe(self) -> dict:
        return {
            "layout": self.layout,
            "files": self.files,
            "windows": len(self.clips),
            "classes": len(self.labels),
            "groups": len({c.src_file for c in self.clips}),
            "padded_files": self.padded,
            "windowed_files": self.windowed,
            "audio_seconds": round(self.seconds, 1),
            "folds": sorted({c.fold for c in self.clips}) if self.fixed_folds else [],
            "classes_present": len({c.target for c in self.clips}),
            "missing": 0,
        }


@dataclass(frozen=True)
class Listed:
    """One clip as the folder or labels.csv lists it, before decoding."""

    name: str  # path relative to DATA, "/"-separated: the clip's id in every report
    path: Path
    label: str
    group: str
    fold: int  # 0: none given


def window_starts(n_samples: int, clip: int = CLIP_SAMPLES, rate: int = SAMPLE_RATE) -> list[int]:
    """The service's windows of a clip of `n_samples` (see service/audio.py window_starts:
    train may not import service, so the rule is restated here and tested against it)."""
    if n_samples <= clip + int(SLACK_SECONDS * rate):
        return [0]
    last, hop = n_samples - clip, int(HOP_SECONDS * rate)
    return [*range(0, last, hop), last]


def is_labelled_folder(root: str | Path) -> bool:
    """A labelled folder, not the ESC-50 layout (meta/esc50.csv + audio/)."""
    return Path(root).is_dir() and not (Path(root) / "meta" / "esc50.csv").is_file()


def select_source(
    root: str | Path, folds: list[int] | None = None, esc10: bool = False
) -> D.Selection:
    """ESC-50's layout through train.data, anything else as a labelled folder."""
    if not Path(root).is_dir():
        raise D.DataError(f"dataset folder {root} does not exist")
    if not is_labelled_folder(root):
        return D.select(root, folds, esc10)
    if esc10:
        raise D.DataError("--esc10 applies to the ESC-50 layout, not to a labelled folder")
    return select_folder(root, folds)


# --------------------------------------------------------------------------- listing


def list_clips(root: Path, problems: dict[str, list[str]]) -> tuple[list[Listed], str, list[str]]:
    """(the clips listed, the layout, notes on what was ignored)."""
    if (root / LABELS_CSV).is_file():
        return _list_csv(root, problems), LABELS_CSV, []
    listed, notes, stray = [], [], []
    ignored: Counter[str] = Counter()
    for label_dir in sorted(p for p in root.iterdir() if not p.name.startswith(".")):
        if not label_dir.is_dir():
            if label_dir.suffix.lower() in D.AUDIO_SUFFIXES:
                stray.append(label_dir.name)
            continue
        for path in sorted(label_dir.rglob("*")):
            rel = path.relative_to(root).as_posix()
            if any(part.startswith(".") for part in path.relative_to(root).parts):
                continue  # .DS_Store, editors' swap files, hidden folders
            if path.is_file() and path.suffix.lower() in D.AUDIO_SUFFIXES:
                listed.append(Listed(rel, path, label_dir.name, rel, 0))
            elif path.is_file():
                ignored[path.suffix.lower() or "(none)"] += 1
    if stray:
        problems["audio files outside a label folder (move them into DATA/<label>/)"] += stray
    if ignored:
        notes.append(
            "ignored files that are not audio: "
            + ", ".join(f"{n} {ext}" for ext, n in sorted(ignored.items()))
        )
    return listed, "folders", notes


def _list_csv(root: Path, problems: dict[str, list[str]]) -> list[Listed]:
    path = root / LABELS_CSV
    with open(path, newline="", encoding="utf-8-sig") as f:  # -sig: spreadsheets write a BOM
        reader = csv.DictReader(f)
        columns = [c.strip() for c in reader.fieldnames or []]
        rows = [{(k or "").strip(): (v or "").strip() for k, v in r.items()} for r in reader]
    if missing := [c for c in ("filename", "label") if c not in columns]:
        raise D.DataError(
            f"{path} lacks the column(s) {', '.join(missing)}: expected a header "
            f"filename,label[,group][,fold] (it has {', '.join(columns) or 'none'})"
        )
    has_fold = "fold" in columns
    listed, seen = [], set()
    for line, r in enumerate(rows, start=2):  # line 1 is the header
        name, label = r["filename"].replace("\\", "/"), r["label"]
        where = f"{LABELS_CSV} line {line}"
        if not name or not label:
            problems["labels.csv rows without a filename or a label"].append(where)
            continue
        if name in seen:
            problems["files listed twice in labels.csv"].append(f"{where}: {name}")
            continue
        seen.add(name)
        fold = 0
        if has_fold:
            try:
                fold = int(r["fold"])
                if fold < 1:
                    raise ValueError
            except ValueError:
                problems["folds that are not positive integers"].append(f"{where}: {r['fold']!r}")
                continue
        listed.append(Listed(name, root / name, label, r.get("group") or name, fold))
    if not rows:
        raise D.DataError(f"{path} lists no clips")
    return listed


# --------------------------------------------------------------------------- checking


def check_listing(listed: list[Listed], problems: dict[str, list[str]]) -> None:
    """Problems of names, labels, groups and folds (no decoding)."""
    labels = sorted({c.label for c in listed})
    if bad := [lab for lab in labels if not NAME_RE.match(lab)]:
        problems[f"label names that are not valid names ({NAME_RULE})"] += [repr(b) for b in bad]
    by_lower: dict[str, list[str]] = defaultdict(list)
    for lab in labels:
        by_lower[lab.lower()].append(lab)
    if clash := [" / ".join(v) for v in by_lower.values() if len(v) > 1]:
        problems["labels that differ only in case"] += clash
    folds_of: dict[str, set[int]] = defaultdict(set)
    for c in listed:
        folds_of[c.group].add(c.fold)
    if straddle := [f"{g}: folds {sorted(f)}" for g, f in folds_of.items() if len(f) > 1]:
        problems["groups split across folds (a group must stay in one fold)"] += straddle
    if any(c.fold for c in listed) and not all(c.fold for c in listed):
        problems["labels.csv gives a fold to some clips only"].append(
            f"{sum(not c.fold for c in listed)} clips have none"
        )


_LENGTHS: dict[tuple[str, int, int], int] = {}


def decoded_length(path: Path) -> int:
    """Samples at the model's rate, decoding the file once per process (every run of a job
    selects the folder again); a file changed since is decoded again."""
    try:
        st = path.stat()
        key = (str(path.resolve()), st.st_size, st.st_mtime_ns)
    except OSError:
        key = None
    if key is None or key not in _LENGTHS:
        n = len(read_audio(path, SAMPLE_RATE).waveform)  # raises AudioError: no such file...
        if key is None:
            return n
        _LENGTHS[key] = n
    return _LENGTHS[key]


def check_classes(listed: list[Listed], readable: set[str], problems: dict[str, list[str]]) -> None:
    """Every class needs two readable clips in two groups: one to learn from, one to check on."""
    clips: Counter[str] = Counter()
    groups: dict[str, set[str]] = defaultdict(set)
    for c in listed:
        if c.name in readable:
            clips[c.label] += 1
            groups[c.label].add(c.group)
    for label in sorted({c.label for c in listed}):
        if clips[label] < 2:
            problems["classes with fewer than 2 readable clips"].append(f"{label} ({clips[label]})")
        elif len(groups[label]) < 2:
            problems["classes whose clips are all one group (no honest split possible)"].append(
                f"{label} ({clips[label]} clips, group {next(iter(groups[label]))!r})"
            )
    if len(clips) < 2:
        problems["fewer than 2 classes with clips"].append(f"found {sorted(clips) or 'none'}")


def raise_problems(root: Path, problems: dict[str, list[str]]) -> None:
    if not any(problems.values()):
        return
    lines = [f"{root} is not usable as a labelled folder:"]
    for kind, items in problems.items():
        if not items:
            continue
        shown = ", ".join(items[:MAX_LISTED])
        more = f" (and {len(items) - MAX_LISTED} more)" if len(items) > MAX_LISTED else ""
        lines.append(f"- {kind}: {shown}{more}")
    lines.append(
        "Layout: DATA/<label>/<clip>.wav|flac|ogg|mp3|... or DATA/labels.csv "
        "(filename,label[,group][,fold]); see docs/own-sounds.md"
    )
    raise D.DataError("\n".join(lines))


# --------------------------------------------------------------------------- selection


def select_folder(root: str | Path, folds: list[int] | None = None) -> FolderSelection:
    """Decode every listed clip once (lengths, and a list of every unreadable one), check the
    whole folder, and return its windows as clips. DataError lists every problem at once."""
    root = Path(root)
    if not root.is_dir():
        raise D.DataError(f"dataset folder {root} does not exist")
    problems: dict[str, list[str]] = defaultdict(list)
    listed, layout, notes = list_clips(root, problems)
    if not listed and not any(problems.values()):
        raise D.DataError(
            f"{root} holds no clips: expected DATA/<label>/<clip>.wav|flac|ogg|mp3|... "
            f"or {LABELS_CSV} (filename,label[,group][,fold])"
        )
    check_listing(listed, problems)
    lengths: dict[str, int] = {}
    for c in listed:
        try:
            lengths[c.name] = decoded_length(c.path)
        except AudioError as e:
            problems["unreadable files"].append(str(e))
    check_classes(listed, set(lengths), problems)
    raise_problems(root, problems)
    labels = sorted({c.label for c in listed})
    fixed = any(c.fold for c in listed)
    if folds is not None:
        if not fixed:
            raise D.DataError(
                f"--folds selects folds of {LABELS_CSV}'s fold column; {root} has none"
            )
        listed = [c for c in listed if c.fold in folds]
        if not listed:
            raise D.DataError(f"no clips of folds {folds} in {root / LABELS_CSV}")
    sel = FolderSelection([], labels, [], root=root, layout=layout, fixed_folds=fixed, notes=notes)
    for c in listed:
        n = lengths[c.name]
        starts = window_starts(n)
        sel.files += 1
        sel.seconds += n / SAMPLE_RATE
        sel.padded += n < CLIP_SAMPLES
        sel.windowed += len(starts) > 1
        for k, start in enumerate(starts):
            stem = c.name if len(starts) == 1 else f"{c.name}#{k}"
            target = labels.index(c.label)
            sel.clips.append(D.Clip(stem, c.path, c.fold, target, c.label, False, c.group, start))
    for note in notes:
        log.info("%s: %s", root, note)
    return sel


def clip_of(stem: str) -> str:
    """The clip a window's stem belongs to ("a/b.wav#2" -> "a/b.wav")."""
    return stem.rsplit("#", 1)[0] if "#" in stem else stem


def mean_by_clip(stems: list[str], probs: np.ndarray, targets: np.ndarray) -> tuple:
    """Windows -> clips, as the service answers: (clip names, mean probabilities, targets)."""
    order: dict[str, list[int]] = {}
    for i, s in enumerate(stems):
        order.setdefault(clip_of(str(s)), []).append(i)
    names = list(order)
    mean = np.stack([probs[idx].mean(0) for idx in order.values()])
    return names, mean, np.array([targets[idx[0]] for idx in order.values()])


# --------------------------------------------------------------------------- grouped splits


def group_parts(clips: list[D.Clip], k: int, seed: int) -> dict[str, int]:
    """group -> part in 0..k-1: whole groups, classes spread evenly (stratified group k-fold).

    A group may hold several classes (one speaker saying several words), so groups are
    placed whole, biggest first, each where it keeps every class's share of the parts most
    even (ties: the part with fewest clips)."""
    members: dict[str, list[int]] = defaultdict(list)
    for c in clips:
        members[c.src_file].append(c.target)
    n_classes = max(c.target for c in clips) + 1
    totals = np.bincount([c.target for c in clips], minlength=n_classes).clip(min=1)
    order = sorted(members)
    random.Random(seed).shuffle(order)
    order.sort(key=lambda g: -len(members[g]))  # stable: ties stay in the seeded order
    counts = np.zeros((k, n_classes))
    part_of = {}
    for g in order:
        y = np.bincount(members[g], minlength=n_classes)

        def cost(p: int, y=y) -> tuple[float, float]:
            trial = counts.copy()
            trial[p] += y
            return float((trial / totals).std(axis=0).mean()), float(counts[p].sum())

        best = min(range(k), key=cost)
        counts[best] += y
        part_of[g] = best
    return part_of


def split_groups(
    clips: list[D.Clip], k: int, index: int, seed: int
) -> tuple[list[D.Clip], list[D.Clip]]:
    """Grouped k-fold over a folder's clips: part `index` validates, the rest trains. With a
    fold column the parts are its folds (in order); else `group_parts` makes them."""
    if not 0 <= index < k or k < 2:
        raise D.DataError(f"cv index {index} is not in 0..{k - 1} (k={k})")
    given = sorted({c.fold for c in clips if c.fold})
    if given:
        if len(given) != k:
            raise D.DataError(
                f"{LABELS_CSV} names {len(given)} folds ({given}): pass --folds {len(given)}"
            )
        val = [c for c in clips if c.fold == given[index]]
        return [c for c in clips if c.fold != given[index]], val
    part_of = group_parts(clips, k, seed)
    return (
        [c for c in clips if part_of[c.src_file] != index],
        [c for c in clips if part_of[c.src_file] == index],
    )


def split_holdout_groups(
    clips: list[D.Clip], fraction: float, seed: int
) -> tuple[list[D.Clip], list[D.Clip]]:
    """A grouped held-out split: one part of round(1 / fraction), groups whole, classes spread
    (the fold column, if any, is not used: folds are for k-fold)."""
    k = max(2, round(1 / fraction))
    part_of = group_parts([*clips], k, seed)
    return (
        [c for c in clips if part_of[c.src_file] != 0],
        [c for c in clips if part_of[c.src_file] == 0],
    )


def splits_for(sel: D.Selection):
    """(held-out split, k-fold split) functions for this data: ESC-50's per-class ones, or
    the folder's, which place groups whole across classes."""
    if isinstance(sel, FolderSelection):
        return split_holdout_groups, split_groups
    return D.split_holdout, D.split_kfold


# --------------------------------------------------------------------------- ESC-10 as a folder


def esc50_as_folder(data_root: str | Path, out: str | Path, esc10: bool = True) -> dict:
    """ESC-50 (or its ESC-10 subset) re-laid out as a labelled folder: OUT/<category>/<file>
    symlinks and OUT/labels.csv with the source recording as the group. Real data in the
    layout users have, for `python -m train finetune`."""
    sel = D.select(data_root, None, esc10)
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise D.DataError(f"{out} exists and is not empty: pass a new folder")
    rows = []
    for c in sel.clips:
        link = out / c.category / c.path.name
        link.parent.mkdir(parents=True, exist_ok=True)
        os.symlink(c.path.resolve(), link)
        rows.append(
            {"filename": link.relative_to(out).as_posix(), "label": c.category, "group": c.src_file}
        )
    with open(out / LABELS_CSV, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["filename", "label", "group"])
        w.writeheader()
        w.writerows(rows)
    return {
        "out": str(out),
        "clips": len(rows),
        "classes": len({r["label"] for r in rows}),
        "groups": len({r["group"] for r in rows}),
    }
