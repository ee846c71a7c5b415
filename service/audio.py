"""Audio in: bytes -> mono float32 at the model's rate -> 5 s windows. CPU only, no torch.

Runs in a worker thread (never on the event loop). Everything the model's front-end does
(STFT, mel, log, normalisation) is inside the ONNX graph; this module only decodes, downmixes,
resamples and cuts, so training and serving cannot drift apart.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np
import soundfile as sf
import soxr

from service.errors import AudioTooLong, InvalidAudio, UnsupportedMediaType

SNDFILE_FORMATS = frozenset(sf.available_formats())  # what this libsndfile build can read
MP3_SUPPORTED = "MP3" in SNDFILE_FORMATS  # libsndfile >= 1.1 built with mpg123/lame
MAX_CHANNELS = 32
MAX_SAMPLE_RATE = 384_000
SINGLE_WINDOW_SLACK_S = 0.1  # audio up to clip + 0.1 s is one (truncated) window, not two
SUPPORTED_TEXT = "WAV (8/16/24/32-bit int, float), FLAC, Ogg Vorbis/Opus" + (
    ", MP3" if MP3_SUPPORTED else ""
)

# (magic bytes at offset, name) for telling a client what its bytes looked like
_SIGNATURES: tuple[tuple[int, bytes, str], ...] = (
    (0, b"RIFF", "WAV"),
    (0, b"RF64", "WAV (RF64)"),
    (0, b"fLaC", "FLAC"),
    (0, b"OggS", "Ogg"),
    (0, b"ID3", "MP3 (ID3 tag)"),
    (0, b"FORM", "AIFF"),
    (4, b"ftyp", "MP4/M4A"),
    (0, b"\x1aE\xdf\xa3", "Matroska/WebM"),
    (0, b"{", "JSON text"),
    (0, b"<", "HTML/XML text"),
    (0, b"%PDF", "PDF"),
    (0, b"\x89PNG", "PNG image"),
    (0, b"\xff\xd8\xff", "JPEG image"),
)


@dataclass(frozen=True)
class DecodedAudio:
    waveform: np.ndarray  # (n_samples,) float32 mono at the model's sample rate
    sample_rate: int  # the input's own rate
    channels: int  # the input's channel count
    format: str  # e.g. "WAV/PCM_24"
    duration_s: float


def sniff(data: bytes) -> str | None:
    """Name the container the first bytes look like, or None."""
    for offset, magic, name in _SIGNATURES:
        if data[offset : offset + len(magic)] == magic:
            return name
    if len(data) >= 2 and data[0] == 0xFF and data[1] & 0xE0 == 0xE0:
        return "MP3 (MPEG frame sync)"
    return None


def _undecodable(data: bytes) -> UnsupportedMediaType:
    seen = sniff(data)
    if seen is None:
        return UnsupportedMediaType(
            f"could not recognise an audio format; supported: {SUPPORTED_TEXT}"
        )
    if seen.startswith("MP3") and not MP3_SUPPORTED:
        return UnsupportedMediaType(
            f"recognised {seen}, but this server's libsndfile {sf.__libsndfile_version__} "
            f"cannot decode MP3; supported: {SUPPORTED_TEXT}"
        )
    return UnsupportedMediaType(
        f"recognised {seen} by its header, but could not decode it (truncated, corrupt or an "
        f"unsupported encoding); supported: {SUPPORTED_TEXT}"
    )


def decode(data: bytes, target_rate: int, max_duration_s: float) -> DecodedAudio:
    """Decode any libsndfile format to mono float32 at `target_rate`.

    Raises UnsupportedMediaType (415), AudioTooLong (413) or InvalidAudio (422).
    """
    try:
        f = sf.SoundFile(io.BytesIO(data))
    except (sf.LibsndfileError, RuntimeError, TypeError):
        raise _undecodable(data) from None
    with f:
        fmt = f"{f.format}/{f.subtype}"
        if not 0 < f.channels <= MAX_CHANNELS or not 0 < f.samplerate <= MAX_SAMPLE_RATE:
            raise UnsupportedMediaType(
                f"recognised {fmt} with {f.channels} channels at {f.samplerate} Hz; "
                f"need 1-{MAX_CHANNELS} channels at up to {MAX_SAMPLE_RATE} Hz"
            )
        # The header's length is checked before decoding anything: no work for too-long audio.
        if f.frames > 0 and f.frames / f.samplerate > max_duration_s:
            raise _too_long(f.frames / f.samplerate, max_duration_s)
        try:
            samples = f.read(dtype="float32", always_2d=True)  # (frames, channels)
        except (sf.LibsndfileError, RuntimeError):
            raise _undecodable(data) from None
        rate, channels = f.samplerate, f.channels
    return _to_model_input(samples, rate, channels, fmt, target_rate, max_duration_s)


def _too_long(duration_s: float, max_duration_s: float) -> AudioTooLong:
    return AudioTooLong(f"audio is {duration_s:.1f} s long; the limit is {max_duration_s:g} s")


def _to_model_input(
    samples: np.ndarray, rate: int, channels: int, fmt: str, target_rate: int, max_s: float
) -> DecodedAudio:
    if samples.shape[0] == 0:
        raise InvalidAudio(f"decoded {fmt}, but it holds no audio samples")
    duration_s = samples.shape[0] / rate
    if duration_s > max_s:
        raise _too_long(duration_s, max_s)
    if not np.isfinite(samples).all():
        raise InvalidAudio(f"decoded {fmt}, but it contains NaN or infinite samples")
    mono = samples.mean(axis=1, dtype=np.float32) if channels > 1 else samples[:, 0]
    if rate != target_rate:
        mono = soxr.resample(mono, rate, target_rate, quality="HQ")
    mono = np.ascontiguousarray(mono, dtype=np.float32)
    return DecodedAudio(mono, rate, channels, fmt, duration_s)


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
