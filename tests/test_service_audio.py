"""service.audio: the reader's errors as HTTP errors, and windows. Decoding itself (formats,
channels, rates, bad data) is contract.audio's, tested in test_audio_reader.py."""

from __future__ import annotations

import io

import numpy as np
import pytest
import soundfile as sf

from contract.audio import read_audio
from service.audio import decode, make_windows, window_starts
from service.errors import (
    AudioTooLarge,
    AudioTooLong,
    InvalidAudio,
    ServiceError,
    UnsupportedMediaType,
)

SR = 44100
CLIP = 5 * SR


def encode(x: np.ndarray, sr: int, subtype: str = "FLOAT") -> bytes:
    buf = io.BytesIO()
    sf.write(buf, x, sr, format="WAV", subtype=subtype)
    return buf.getvalue()


def test_decode_is_the_contract_reader() -> None:
    data = encode(np.sin(np.arange(48000) / 7).astype(np.float32), 48000)
    np.testing.assert_array_equal(decode(data, SR, 60).waveform, read_audio(data, SR).waveform)


NAN_WAV = encode(np.array([0.0, np.nan, 0.0], np.float32), SR)
HEADER_ONLY = encode(np.zeros(8000, np.float32), 8000, "PCM_16")[:44]


@pytest.mark.parametrize(
    ("data", "error", "status", "message"),
    [
        (b"not audio" * 10, UnsupportedMediaType, 415, "could not recognise"),
        (encode(np.zeros(60 * 8000, np.float32), 8000), AudioTooLong, 413, "the limit is 30 s"),
        (NAN_WAV, InvalidAudio, 422, "NaN or infinite"),
        (HEADER_ONLY, InvalidAudio, 422, "no audio samples"),
    ],
    ids=["undecodable", "too long", "non-finite", "no samples"],
)
def test_reader_errors_become_http_errors(data, error, status, message) -> None:
    with pytest.raises(error, match=message) as info:
        decode(data, SR, 30)
    assert isinstance(info.value, ServiceError) and info.value.status == status


def test_caps_and_budget_come_from_the_caller() -> None:
    """The service passes its settings: 4 channels at 96 kHz for 2 s are 768,000 samples to
    decode, past a budget of 1 s of one channel at 96 kHz x 5 s = 480,000 (413), and past a
    cap of 2 channels (415)."""
    data = encode(np.zeros((2 * 96000, 4), np.float32), 96000)
    with pytest.raises(AudioTooLarge, match="768,000 samples to decode") as info:
        decode(data, SR, 5, max_channels=4, max_source_rate=96000)
    assert info.value.status == 413 and info.value.code == "audio_too_large"
    with pytest.raises(UnsupportedMediaType, match="need 1-2 channels"):
        decode(data, SR, 5, max_channels=2)
    assert decode(data, SR, 10, max_channels=4, max_source_rate=96000).channels == 4


@pytest.mark.parametrize(
    ("n", "expected"),
    [
        (SR // 5, [0]),
        (CLIP, [0]),
        (CLIP + SR // 20, [0]),  # short / exact / within slack
        (CLIP + SR, [0, SR]),
        (12 * SR, [0, 110250, 220500, 7 * SR]),
    ],
)
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
