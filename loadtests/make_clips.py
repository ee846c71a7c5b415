"""Regenerate the small bundled clips in loadtests/clips/ (formats, rates, lengths, channels
that the ESC-50 clips don't cover). Run: .venv/bin/python loadtests/make_clips.py"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import soundfile as sf

CLIPS = Path(__file__).resolve().parent / "clips"
# name, seconds, sample rate, channels, soundfile subtype
SPECS = [
    ("tone-1s-8k.flac", 1, 8000, 1, "PCM_16"),
    ("tone-3s-22k.flac", 3, 22050, 1, "PCM_16"),
    ("tone-8s-16k.ogg", 8, 16000, 1, "VORBIS"),
    ("tone-12s-32k-stereo.ogg", 12, 32000, 2, "VORBIS"),
]
# A clip no model here trained on, for the README's example: bird-like chirps (short rising
# sweeps, 3-5 kHz, at random times), 5 s at 44.1 kHz.
CHIRPS = ("chirps-5s-44k.ogg", 5, 44100)


def tone(seconds: float, sr: int, channels: int, f0: float = 440.0) -> np.ndarray:
    """Two tones under a slow tremolo with a trace of noise: decodes like audio, stays small."""
    t = np.arange(int(seconds * sr)) / sr
    x = 0.3 * np.sin(2 * np.pi * f0 * t) * (0.6 + 0.4 * np.sin(np.pi * t))
    x += 0.1 * np.sin(2 * np.pi * 1.5 * f0 * t)
    x += 0.0005 * np.random.default_rng(0).standard_normal(t.size)
    x = x.astype(np.float32)
    return np.stack([x, np.roll(x, 100)], axis=1) if channels == 2 else x


def chirps(seconds: float, sr: int, n: int = 15) -> np.ndarray:
    rng = np.random.default_rng(0)
    x = np.zeros(int(seconds * sr))
    length = int(0.08 * sr)
    t = np.arange(length) / sr
    sweep = np.sin(2 * np.pi * (3000 * t + 15000 * t**2)) * np.hanning(length)
    for start in rng.uniform(0, seconds - 0.1, n):
        i = int(start * sr)
        x[i : i + length] += sweep
    return (0.3 * x).astype(np.float32)


def main() -> None:
    CLIPS.mkdir(exist_ok=True)
    for name, seconds, sr, channels, subtype in SPECS:
        sf.write(CLIPS / name, tone(seconds, sr, channels), sr, subtype=subtype)
        print(f"{name}: {(CLIPS / name).stat().st_size // 1024} KiB")
    name, seconds, sr = CHIRPS
    sf.write(CLIPS / name, chirps(seconds, sr), sr, subtype="VORBIS")
    print(f"{name}: {(CLIPS / name).stat().st_size // 1024} KiB")


if __name__ == "__main__":
    main()
