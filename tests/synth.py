"""Generated audio and a tiny dataset in the ESC-50 layout, for tests that run without ../shared."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import soundfile as sf

SR = 44100


def tone(freq: float, seconds: float = 5.0, sr: int = SR, amp: float = 0.3, seed: int = 0):
    """A sine with a little noise, float32 mono."""
    t = np.arange(int(seconds * sr)) / sr
    rng = np.random.default_rng(seed)
    return (amp * np.sin(2 * np.pi * freq * t) + 0.01 * rng.standard_normal(t.size)).astype(
        np.float32
    )


def make_dataset(
    root: Path, classes=("dog", "rain", "siren"), per_class: int = 4, seconds: float = 5.0
) -> Path:
    """ESC-50 layout: meta/esc50.csv + audio/<fold>-<src>-<take>-<target>.{wav,flac,ogg}."""
    (root / "meta").mkdir(parents=True, exist_ok=True)
    (root / "audio").mkdir(parents=True, exist_ok=True)
    rows, formats = [], [("wav", "PCM_16"), ("flac", "PCM_16"), ("ogg", "VORBIS")]
    for target, name in enumerate(classes):
        for i in range(per_class):
            fold, src = i % 2 + 1, 1000 * (target + 1) + i
            stem = f"{fold}-{src}-A-{target}"
            ext, subtype = formats[(target + i) % len(formats)]
            x = tone(220.0 * (2**target) * (1 + 0.05 * i), seconds, seed=src)
            sf.write(root / "audio" / f"{stem}.{ext}", x, SR, subtype=subtype)
            rows.append(
                {
                    "filename": f"{stem}.wav",
                    "fold": fold,
                    "target": target,
                    "category": name,
                    "esc10": "True",
                    "src_file": src,
                    "take": "A",
                }
            )
    with open(root / "meta" / "esc50.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    return root
