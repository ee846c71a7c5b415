"""service.audio: every input format the API promises, down to mono 44.1 kHz windows."""

from __future__ import annotations

import io

import numpy as np
import pytest
import soundfile as sf

from service.audio import MP3_SUPPORTED, decode, make_windows, sniff, window_starts
from service.errors import AudioTooLong, InvalidAudio, UnsupportedMediaType

SR = 44100
CLIP = 5 * SR


def encode(x: np.ndarray, sr: int, fmt: str = "WAV", subtype: str | None = None) -> bytes:
    buf = io.BytesIO()
    sf.write(buf, x, sr, format=fmt, subtype=subtype)
    return buf.getvalue()


def tone(seconds: float, sr: int, freq: float = 440.0, channels: int = 1) -> np.ndarray:
    t = np.arange(int(seconds * sr)) / sr
    x = (0.3 * np.sin(2 * np.pi * freq * t)).astype(np.float32)
    return np.stack([x] * channels, axis=1) if channels > 1 else x


@pytest.mark.parametrize(
    ("fmt", "subtype"),
    [("WAV", "PCM_U8"), ("WAV", "PCM_16"), ("WAV", "PCM_24"), ("WAV", "PCM_32"),
     ("WAV", "FLOAT"), ("WAV", "DOUBLE"), ("FLAC", "PCM_16"), ("FLAC", "PCM_24"),
     ("OGG", "VORBIS"), ("OGG", "OPUS")],
)  # fmt: skip
def test_decodes_formats_to_mono_model_rate(fmt: str, subtype: str) -> None:
    sr = 48000 if subtype == "OPUS" else SR  # Opus only knows 8/12/16/24/48 kHz
    audio = decode(encode(tone(1.0, sr), sr, fmt, subtype), SR, 60)
    assert audio.waveform.dtype == np.float32 and audio.waveform.ndim == 1
    assert abs(len(audio.waveform) - SR) <= 0.01 * SR
    assert audio.format == f"{fmt}/{subtype}"
    assert 0.2 < np.abs(audio.waveform).max() < 0.4  # the tone survived, scaled to [-1, 1]


@pytest.mark.skipif(not MP3_SUPPORTED, reason="this libsndfile build has no MP3")
def test_decodes_mp3() -> None:
    audio = decode(encode(tone(1.0, SR), SR, "MP3"), SR, 60)
    assert audio.format.startswith("MP3") and abs(audio.duration_s - 1.0) < 0.1


def test_stereo_48k_is_downmixed_and_resampled() -> None:
    x = tone(2.0, 48000, channels=2)
    x[:, 1] = -x[:, 1] * 0.5  # channels differ: (0.3 - 0.15) / 2 = 0.075 peak
    audio = decode(encode(x, 48000, "WAV", "FLOAT"), SR, 60)
    assert (audio.sample_rate, audio.channels) == (48000, 2)
    assert len(audio.waveform) == 2 * SR
    assert 0.07 < np.abs(audio.waveform[1000:-1000]).max() < 0.08


def test_8k_is_resampled() -> None:
    audio = decode(encode(tone(1.0, 8000, 300.0), 8000), SR, 60)
    assert audio.sample_rate == 8000 and len(audio.waveform) == SR


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_samples_are_422(bad: float) -> None:
    x = tone(0.5, SR)
    x[100] = bad
    with pytest.raises(InvalidAudio, match="NaN or infinite"):
        decode(encode(x, SR, "WAV", "FLOAT"), SR, 60)


def test_duration_limit_is_checked_from_the_header() -> None:
    with pytest.raises(AudioTooLong, match="60.0 s long; the limit is 30 s"):
        decode(encode(np.zeros(60 * 8000, np.float32), 8000), SR, 30)


def test_undecodable_bytes_say_what_was_recognised() -> None:
    wav = encode(tone(1.0, SR), SR)
    with pytest.raises(UnsupportedMediaType, match="recognised WAV by its header"):
        decode(wav[:20], SR, 60)
    with pytest.raises(UnsupportedMediaType, match="could not recognise"):
        decode(b"definitely not audio" * 10, SR, 60)
    with pytest.raises(UnsupportedMediaType, match="recognised PNG image"):
        decode(b"\x89PNG\r\n\x1a\n" + bytes(100), SR, 60)
    with pytest.raises(InvalidAudio, match="no audio samples"):
        decode(wav[:44], SR, 60)  # a header and nothing else


def test_truncated_wav_data_decodes_what_is_there() -> None:
    wav = encode(tone(1.0, SR), SR)
    audio = decode(wav[: len(wav) // 2], SR, 60)
    assert abs(audio.duration_s - 0.5) < 0.01


def test_sniff() -> None:
    assert (
        sniff(b"fLaC...") == "FLAC"
        and sniff(b"OggS") == "Ogg"
        and sniff(b"\xff\xfb\x90") == ("MP3 (MPEG frame sync)")
    )
    assert sniff(b"") is None


@pytest.mark.parametrize(
    ("n", "expected"),
    [(SR // 5, [0]), (CLIP, [0]), (CLIP + SR // 20, [0]),  # short / exact / within slack
     (CLIP + SR, [0, SR]), (12 * SR, [0, 110250, 220500, 7 * SR])],
)  # fmt: skip
def test_window_starts(n: int, expected: list[int]) -> None:
    assert window_starts(n, CLIP, SR * 5 // 2, SR // 10) == expected


def test_make_windows_pads_short_and_cuts_long() -> None:
    short, starts = make_windows(np.ones(SR // 5, np.float32), CLIP, CLIP // 2, SR // 10)
    assert short.shape == (1, CLIP) and starts == [0]
    assert short[0, : SR // 5].all() and not short[0, SR // 5 :].any()
    x = np.arange(12 * SR, dtype=np.float32)
    windows, starts = make_windows(x, CLIP, CLIP // 2, SR // 10)
    assert windows.shape == (4, CLIP) and windows.flags.c_contiguous
    for w, s in zip(windows, starts, strict=True):
        np.testing.assert_array_equal(w, x[s : s + CLIP])
