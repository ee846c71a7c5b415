"""The one audio reader: bytes or a path -> mono float32 at the artifact's rate. No torch.

Training, evaluation, export calibration and verification, and the service all decode with
`read_audio`, so the waveform a model trained on and the one it is served are made by the same
code. Everything the model's front-end does (STFT, mel, log, normalisation) is inside the
exported graph; this only decodes (libsndfile), downmixes (channel mean) and resamples (soxr HQ).
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import soundfile as sf
import soxr

from .errors import AudioTooLong, InvalidAudio, UnsupportedAudio

SAMPLE_RATE = 44100  # Hz; the rate the models are trained and exported at (ESC-50's own)
CLIP_SECONDS = 5  # seconds per example (an ESC-50 clip)
CLIP_SAMPLES = SAMPLE_RATE * CLIP_SECONDS  # 220500 samples

SNDFILE_FORMATS = frozenset(sf.available_formats())  # what this libsndfile build can read
MP3_SUPPORTED = "MP3" in SNDFILE_FORMATS  # libsndfile >= 1.1 built with mpg123/lame
MAX_CHANNELS = 32
MAX_SAMPLE_RATE = 384_000
SUPPORTED_TEXT = "WAV (8/16/24/32-bit int, float), FLAC, Ogg Vorbis/Opus" + (
    ", MP3" if MP3_SUPPORTED else ""
)

# (magic bytes at offset, name): to tell a user what undecodable bytes looked like
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
    waveform: np.ndarray  # (n_samples,) float32 mono at the requested sample rate
    sample_rate: int  # the input's own rate
    channels: int  # the input's channel count
    format: str  # e.g. "WAV/PCM_24"
    duration_s: float  # of the input


def sniff(data: bytes) -> str | None:
    """Name the container the first bytes look like, or None."""
    for offset, magic, name in _SIGNATURES:
        if data[offset : offset + len(magic)] == magic:
            return name
    if len(data) >= 2 and data[0] == 0xFF and data[1] & 0xE0 == 0xE0:
        return "MP3 (MPEG frame sync)"
    return None


def read_audio(
    source: bytes | str | Path, sample_rate: int = SAMPLE_RATE, max_duration_s: float | None = None
) -> DecodedAudio:
    """Decode any libsndfile format to mono float32 at `sample_rate`, full length.

    Raises UnsupportedAudio, AudioTooLong (past `max_duration_s`, from the header when it says)
    or InvalidAudio; for a path the message starts with it.
    """
    where = "" if isinstance(source, bytes) else f"{source}: "
    try:
        f = sf.SoundFile(io.BytesIO(source) if isinstance(source, bytes) else str(source))
    except (sf.LibsndfileError, RuntimeError, TypeError, OSError):
        raise _undecodable(source, where) from None
    with f:
        fmt = f"{f.format}/{f.subtype}"
        if not 0 < f.channels <= MAX_CHANNELS or not 0 < f.samplerate <= MAX_SAMPLE_RATE:
            raise UnsupportedAudio(
                f"{where}recognised {fmt} with {f.channels} channels at {f.samplerate} Hz; "
                f"need 1-{MAX_CHANNELS} channels at up to {MAX_SAMPLE_RATE} Hz"
            )
        # The header's length is checked before decoding anything: no work for too-long audio.
        if max_duration_s is not None and f.frames > 0:
            _check_duration(f.frames / f.samplerate, max_duration_s, where)
        try:
            samples = f.read(dtype="float32", always_2d=True)  # (frames, channels)
        except (sf.LibsndfileError, RuntimeError):
            raise _undecodable(source, where) from None
        rate, channels = f.samplerate, f.channels
    if samples.shape[0] == 0:
        raise InvalidAudio(f"{where}decoded {fmt}, but it holds no audio samples")
    duration_s = samples.shape[0] / rate
    if max_duration_s is not None:  # headers of streamed files may not know their length
        _check_duration(duration_s, max_duration_s, where)
    if not np.isfinite(samples).all():
        raise InvalidAudio(f"{where}decoded {fmt}, but it contains NaN or infinite samples")
    mono = samples.mean(axis=1, dtype=np.float32) if channels > 1 else samples[:, 0]
    if rate != sample_rate:
        mono = soxr.resample(mono, rate, sample_rate, quality="HQ")
    mono = np.ascontiguousarray(mono, dtype=np.float32)
    return DecodedAudio(mono, rate, channels, fmt, duration_s)


def _check_duration(duration_s: float, max_duration_s: float, where: str) -> None:
    if duration_s > max_duration_s:
        raise AudioTooLong(
            f"{where}audio is {duration_s:.1f} s long; the limit is {max_duration_s:g} s"
        )


def _undecodable(source: bytes | str | Path, where: str) -> UnsupportedAudio:
    if not isinstance(source, bytes) and not Path(source).is_file():
        return UnsupportedAudio(f"{where}no such file")
    head = source[:16] if isinstance(source, bytes) else _head(Path(source))
    seen = sniff(head)
    if seen is None:
        return UnsupportedAudio(
            f"{where}could not recognise an audio format; supported: {SUPPORTED_TEXT}"
        )
    if seen.startswith("MP3") and not MP3_SUPPORTED:
        return UnsupportedAudio(
            f"{where}recognised {seen}, but this libsndfile {sf.__libsndfile_version__} "
            f"cannot decode MP3; supported: {SUPPORTED_TEXT}"
        )
    return UnsupportedAudio(
        f"{where}recognised {seen} by its header, but could not decode it (truncated, corrupt or "
        f"an unsupported encoding); supported: {SUPPORTED_TEXT}"
    )


def _head(path: Path) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read(16)
    except OSError:
        return b""
