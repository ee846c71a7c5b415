"""Audio in for the service: bytes -> the contract reader -> 5 s windows. CPU only, no torch.

Runs in a worker thread (never on the event loop). Decoding, downmixing and resampling are
contract.audio's, the same reader training and export use; this module adds what is HTTP's:
the limits from settings, the reader's errors as HTTP errors, and cutting into windows.
"""

from __future__ import annotations

import numpy as np

from contract.audio import MAX_CHANNELS, MAX_SAMPLE_RATE, DecodedAudio, read_audio
from contract.errors import AudioError
from service.errors import from_audio_error

SINGLE_WINDOW_SLACK_S = 0.1  # audio up to clip + 0.1 s is one (truncated) window, not two


def decode(
    data: bytes,
    target_rate: int,
    max_duration_s: float,
    max_channels: int = MAX_CHANNELS,
    max_source_rate: int = MAX_SAMPLE_RATE,
) -> DecodedAudio:
    """Mono float32 at `target_rate`, decoded block by block within the reader's budget (see
    contract.audio.Budget); UnsupportedMediaType (415), AudioTooLong or AudioTooLarge (413) or
    InvalidAudio (422) with the reader's message."""
    try:
        return read_audio(data, target_rate, max_duration_s, max_channels, max_source_rate)
    except AudioError as e:
        raise from_audio_error(e) from None


def window_starts(n_samples: int, clip_samples: int, hop_samples: int, slack: int) -> list[int]:
    """Start offsets of the windows scoring `n_samples` of audio.

    Up to one clip (plus `slack`) is one window, zero-padded or truncated. Longer audio gets
    windows every `hop_samples`, and a last one aligned to the end so the tail is scored on
    real audio rather than on padding.
    """
    if n_samples <= clip_samples + slack:
        return [0]
    last = n_samples - clip_samples
    starts = list(range(0, last, hop_samples))
    return starts + [last]


def make_windows(
    waveform: np.ndarray, clip_samples: int, hop_samples: int, slack: int
) -> tuple[np.ndarray, list[int]]:
    """Cut (n_samples,) into (n_windows, clip_samples) float32, zero-padding a short clip."""
    starts = window_starts(len(waveform), clip_samples, hop_samples, slack)
    windows = np.zeros((len(starts), clip_samples), dtype=np.float32)  # (W, clip)
    for i, s in enumerate(starts):
        piece = waveform[s : s + clip_samples]
        windows[i, : len(piece)] = piece
    return windows, starts
