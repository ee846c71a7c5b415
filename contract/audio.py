"""The one audio reader: bytes or a path -> mono float32 at the artifact's rate. No torch.

Training, evaluation, export calibration and verification, and the service all decode with
`read_audio`, so the waveform a model trained on and the one it is served are made by the same
code. Everything the model's front-end does (STFT, mel, log, normalisation) is inside the
exported graph; this only decodes (libsndfile), downmixes (channel mean) and resamples (soxr HQ).
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import soundfile as sf
import soxr

from .errors import AudioTooLarge, AudioTooLong, InvalidAudio, UnsupportedAudio

SAMPLE_RATE = 44100  # Hz; the rate the models are trained and exported at (ESC-50's own)
CLIP_SECONDS = 5  # seconds per example (an ESC-50 clip)
CLIP_SAMPLES = SAMPLE_RATE * CLIP_SECONDS  # 220500 samples

SNDFILE_FORMATS = frozenset(sf.available_formats())  # what this libsndfile build can read
MP3_SUPPORTED = "MP3" in SNDFILE_FORMATS  # libsndfile >= 1.1 built with mpg123/lame
# Defaults of the caps on what a header may claim; the service passes its own settings.
# Decoding is blocked, so neither bounds memory: they refuse absurd headers (libsndfile accepts
# up to 1024 channels and any rate) before any work, and bound a block's decoding CPU.
MAX_CHANNELS = 32  # 22.2 surround is 24; more is a crafted file, not a recording
MAX_SAMPLE_RATE = 384_000  # the highest rate audio interfaces record at (DXD)
# Samples (frames x channels) decoded per block: 1 MiB of float32, so one block stays small
# even at MAX_CHANNELS x MAX_SAMPLE_RATE (about 1/45 s there; about 3 s of mono 44.1 kHz).
DECODE_BLOCK_SAMPLES = 1 << 18
SF_COUNT_MAX = 2**63 - 1  # libsndfile's frame count when a header does not know the length
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
    source: bytes | str | Path,
    sample_rate: int = SAMPLE_RATE,
    max_duration_s: float | None = None,
    max_channels: int = MAX_CHANNELS,
    max_source_rate: int = MAX_SAMPLE_RATE,
) -> DecodedAudio:
    """Decode any libsndfile format to mono float32 at `sample_rate`, full length.

    Decodes in blocks of DECODE_BLOCK_SAMPLES, downmixing and resampling each (soxr's stream
    gives the same samples as one call on the whole signal), so memory is the output plus one
    block, whatever the input's channel count or rate. With `max_duration_s`, a Budget bounds
    the output's length and the samples decoded, from the header before decoding anything and
    again while decoding, for headers that do not know (or misstate) their length.

    Raises UnsupportedAudio, AudioTooLong, AudioTooLarge or InvalidAudio; for a path the
    message starts with it.
    """
    where = "" if isinstance(source, bytes) else f"{source}: "
    try:
        f = sf.SoundFile(io.BytesIO(source) if isinstance(source, bytes) else str(source))
    except (sf.LibsndfileError, RuntimeError, TypeError, OSError):
        raise _undecodable(source, where) from None
    with f:
        fmt = f"{f.format}/{f.subtype}"
        if not 0 < f.channels <= max_channels or not 0 < f.samplerate <= max_source_rate:
            raise UnsupportedAudio(
                f"{where}recognised {fmt} with {f.channels} channels at {f.samplerate} Hz; "
                f"need 1-{max_channels} channels at up to {max_source_rate} Hz"
            )
        budget = None
        if max_duration_s is not None:
            budget = Budget(f, max_duration_s, max_source_rate, where)
            if 0 < f.frames < SF_COUNT_MAX:
                budget.check(f.frames, header=True)
        try:
            mono, frames = _decode_blocks(f, sample_rate, budget, f"{where}decoded {fmt}, but")
        except (sf.LibsndfileError, RuntimeError):
            raise _undecodable(source, where) from None
        rate, channels = f.samplerate, f.channels
    if frames == 0:
        raise InvalidAudio(f"{where}decoded {fmt}, but it holds no audio samples")
    return DecodedAudio(mono, rate, channels, fmt, frames / rate)


class Budget:
    """What one file may cost: at most `max_duration_s` of audio, and at most as many decoded
    samples (frames x channels) as `max_duration_s` of one channel at `max_source_rate`. The
    second bounds decoding CPU: a few hundred KB of FLAC silence can claim 8 channels at
    384 kHz (340 M samples, seconds of CPU for audio the downmix averages away); no real
    recording under the service's body limit comes near it."""

    def __init__(self, f: sf.SoundFile, max_duration_s: float, max_source_rate: int, where: str):
        self.rate, self.channels, self.where = f.samplerate, f.channels, where
        self.max_duration_s, self.max_source_rate = max_duration_s, max_source_rate
        self.max_samples = math.floor(max_duration_s * max_source_rate)
        self.max_frames = min(
            math.floor(max_duration_s * self.rate), self.max_samples // self.channels
        )

    def check(self, frames: int, header: bool) -> None:
        """Raise AudioTooLong / AudioTooLarge if `frames` is past the budget: all of the file
        (from its header) or what decoding has reached so far."""
        if frames <= self.max_frames:
            return
        seconds, samples = frames / self.rate, frames * self.channels
        # from the header: the whole file; while decoding: where it stopped (no header length)
        if header:
            length, count = f"{seconds:.1f} s long", f"{samples:,} samples"
        else:
            length = f"longer than {self.max_duration_s:g} s (its header did not say)"
            count = f"more than {self.max_samples:,} samples (its header did not say how many)"
        if seconds > self.max_duration_s:
            raise AudioTooLong(
                f"{self.where}audio is {length}; the limit is {self.max_duration_s:g} s"
            )
        raise AudioTooLarge(
            f"{self.where}{self.channels} channels at {self.rate} Hz are {count} to decode; "
            f"the limit is {self.max_samples:,} ({self.max_duration_s:g} s of one channel at "
            f"{self.max_source_rate} Hz)"
        )


def _decode_blocks(
    f: sf.SoundFile, sample_rate: int, budget: Budget | None, but: str
) -> tuple[np.ndarray, int]:
    """(mono float32 at `sample_rate`, frames decoded): block by block into one reused buffer,
    the output written into one array sized from the header (grown if the header was short)."""
    rate, channels = f.samplerate, f.channels
    block = np.empty((max(1, DECODE_BLOCK_SAMPLES // channels), channels), np.float32)
    stream = resampler(rate, sample_rate) if rate != sample_rate else None
    known = 0 < f.frames < SF_COUNT_MAX
    out = _Output(math.ceil(f.frames * sample_rate / rate) + 64 if known else sample_rate)
    frames, more = 0, True
    while more:
        samples, more = _read_block(f, block)  # (n, channels), a view of `block`
        frames += len(samples)
        if budget is not None:
            budget.check(frames, header=False)
        if not np.isfinite(samples).all():
            raise InvalidAudio(f"{but} it contains NaN or infinite samples")
        mono = samples.mean(axis=1, dtype=np.float32) if channels > 1 else samples[:, 0]
        out.append(mono if stream is None else stream.resample_chunk(mono, last=False))
    if stream is not None and frames:
        out.append(stream.resample_chunk(np.zeros(0, np.float32), last=True))
    return out.samples(), frames


def resampler(source_rate: int, sample_rate: int = SAMPLE_RATE) -> soxr.ResampleStream:
    """The reader's resampler: mono float32, soxr HQ, stateful. Chunks in any sizes give the
    same samples as one call on the whole signal (no clicks at chunk borders); the service's
    live streams (service/streams.py) resample with it as audio arrives."""
    return soxr.ResampleStream(source_rate, sample_rate, 1, dtype="float32", quality="HQ")


class _Output:
    """A growing float32 array: one allocation when the size is known in advance."""

    def __init__(self, capacity: int) -> None:
        self.buffer, self.n = np.empty(capacity, np.float32), 0

    def append(self, x: np.ndarray) -> None:
        if self.n + len(x) > len(self.buffer):  # the header said less, or nothing: double
            grown = np.empty(max(2 * len(self.buffer), self.n + len(x)), np.float32)
            grown[: self.n] = self.buffer[: self.n]
            self.buffer = grown
        self.buffer[self.n : self.n + len(x)] = x
        self.n += len(x)

    def samples(self) -> np.ndarray:
        """The samples written (a view: the spare capacity is a few samples when known)."""
        return self.buffer[: self.n]


def _read_block(f: sf.SoundFile, block: np.ndarray) -> tuple[np.ndarray, bool]:
    """The next frames, read into `block`: ((n, channels), whether more may follow).

    For a stream of unknown length (a FLAC whose encoder did not know it), libsndfile fills
    the buffer on the read that reaches the end, then soundfile fails to move its position
    there and the count is lost. So the buffer is marked NaN first, and the frames read are
    the rows before the first one left NaN (integer PCM never decodes to NaN)."""
    if f.frames == SF_COUNT_MAX:
        block.fill(np.nan)
    try:
        samples = f.read(len(block), dtype="float32", always_2d=True, out=block)
    except sf.LibsndfileError:
        if f.frames != SF_COUNT_MAX:
            raise
        unread = np.isnan(block[:, 0])
        return block[: int(unread.argmax()) if unread.any() else len(block)], False
    return samples, len(samples) == len(block)


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
