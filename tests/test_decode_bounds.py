"""Decode bombs: small compressed files that claim many channels at a high rate for a long time.

The reader refuses them from the header past its budget, or decodes them block by block in
memory proportional to the model-rate mono output (never frames x channels of float32); a real
`python -m service` answers several at once with 200 or 413 within a bounded peak RSS and then
still classifies; /v1/explain takes its place before it reads an upload, as /v1/classify does.
"""

from __future__ import annotations

import io
import json
import os
import socket
import struct
import subprocess
import sys
import textwrap
import time
import tracemalloc
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest
import soundfile as sf
from servers import free_port, serve, wait_ready

from contract.audio import MAX_SAMPLE_RATE, read_audio
from contract.errors import AudioTooLarge, AudioTooLong, UnsupportedAudio
from service.settings import Settings

SR = 44100
MiB = 1 << 20
REPO = Path(__file__).resolve().parent.parent


def flac_silence(seconds: float, rate: int, channels: int) -> bytes:
    """Silence as FLAC, written one second at a time (the encoder's input stays small):
    a few hundred KB however many channels, seconds and samples per second it claims."""
    buf = io.BytesIO()
    second = np.zeros((rate, channels), np.int16)
    with sf.SoundFile(buf, "w", rate, channels, format="FLAC", subtype="PCM_16") as f:
        for _ in range(int(seconds)):
            f.write(second)
    return buf.getvalue()


def unknown_length(flac: bytes) -> bytes:
    """The same FLAC with STREAMINFO's 36-bit total-samples field set to 0 ("unknown", as a
    streaming encoder writes it): libsndfile then reports SF_COUNT_MAX frames."""
    b = bytearray(flac)
    at = 4 + 4 + 10  # "fLaC", the metadata block header, block/frame sizes
    fields = int.from_bytes(b[at : at + 8], "big") & ~((1 << 36) - 1)  # rate|ch|bps|total
    b[at : at + 8] = fields.to_bytes(8, "big")
    return bytes(b)


def wav_claiming_gigabytes(seconds: float = 1.0) -> bytes:
    """A 1-second WAV whose RIFF and data sizes claim almost 4 GiB."""
    buf = io.BytesIO()
    sf.write(buf, np.full((int(seconds * 8000), 2), 0.1, np.float32), 8000, "PCM_16", format="WAV")
    b = bytearray(buf.getvalue())
    data = b.index(b"data")
    b[4:8] = struct.pack("<I", 0xFFFFFFF8)
    b[data + 4 : data + 8] = struct.pack("<I", 0xFFFFFFF0)
    return bytes(b)


def peak_python_bytes(fn) -> tuple[object, int]:
    """fn()'s result and the peak of memory allocated during it (numpy reports its buffers to
    tracemalloc)."""
    tracemalloc.start()
    try:
        try:
            result = fn()
        except Exception as e:  # the refusals are results here
            result = e
        return result, tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


@pytest.fixture(scope="module")
def issue_bomb() -> bytes:
    """The file of issue 15: 8 channels at 384 kHz for 110 s (1.35 GB as float32 frames x
    channels, which the old reader allocated whole)."""
    return flac_silence(110, 384_000, 8)


# --- the reader ----------------------------------------------------------------------------


def test_the_issue_bomb_is_refused_from_its_header(issue_bomb: bytes) -> None:
    assert len(issue_bomb) < MiB
    refused, peak = peak_python_bytes(lambda: read_audio(issue_bomb, SR, max_duration_s=120))
    assert isinstance(refused, AudioTooLarge)
    assert "337,920,000 samples to decode; the limit is 46,080,000" in str(refused)
    assert peak < MiB  # refused before the first block buffer (1 MiB) was allocated


def test_a_bomb_within_the_budget_decodes_in_output_sized_memory() -> None:
    """8 channels at 48 kHz for 60 s: 23 M samples (inside the budget), 92 MB as float32
    frames x channels; the 44.1 kHz mono output is 10.6 MB."""
    data = flac_silence(60, 48_000, 8)
    audio, peak = peak_python_bytes(lambda: read_audio(data, SR, max_duration_s=120))
    assert not isinstance(audio, Exception), audio
    output = 60 * SR * 4
    assert len(audio.waveform) == 60 * SR and audio.channels == 8
    # the output, its blocks before they are joined, one input block and its downmix
    assert peak < 2 * output + 4 * MiB, f"peak {peak / MiB:.1f} MiB"


def test_without_a_budget_decoding_is_still_block_by_block() -> None:
    """Training passes no limit: 8 channels at 384 kHz (123 MB as float32 frames x channels
    for 10 s) still take memory in proportion to the 1.8 MB output."""
    data = flac_silence(10, 384_000, 8)
    audio, peak = peak_python_bytes(lambda: read_audio(data, SR))
    assert not isinstance(audio, Exception), audio
    assert len(audio.waveform) == 10 * SR
    assert peak < 2 * 10 * SR * 4 + 4 * MiB, f"peak {peak / MiB:.1f} MiB"


def test_unknown_length_is_bounded_while_decoding() -> None:
    """A header that does not say how long: the budget stops decoding where it is reached."""
    many = unknown_length(flac_silence(20, 384_000, 8))  # 61 M samples, budget 46 M
    assert sf.info(io.BytesIO(many)).frames > 10**18  # libsndfile: length unknown
    refused, peak = peak_python_bytes(lambda: read_audio(many, SR, max_duration_s=120))
    assert isinstance(refused, AudioTooLarge) and "header did not say" in str(refused)
    assert peak < 16 * MiB, f"peak {peak / MiB:.1f} MiB"  # < 15 s of output, never 61 M x 4 B
    long = unknown_length(flac_silence(40, 8000, 1))
    with pytest.raises(AudioTooLong, match="longer than 30 s"):
        read_audio(long, SR, max_duration_s=30)
    assert read_audio(long, SR).duration_s == 40.0  # no limit: all of it


def test_a_wav_header_claiming_gigabytes_decodes_what_is_there() -> None:
    audio = read_audio(wav_claiming_gigabytes(1.0), SR, max_duration_s=30)
    assert audio.duration_s == 1.0 and len(audio.waveform) == SR


def test_channel_and_rate_caps_are_parameters() -> None:
    buf = io.BytesIO()
    sf.write(buf, np.zeros((100, 64), np.float32), 8000, format="WAV", subtype="PCM_16")
    many = buf.getvalue()
    with pytest.raises(UnsupportedAudio, match="64 channels at 8000 Hz; need 1-32 channels"):
        read_audio(many, SR, max_duration_s=30)
    assert read_audio(many, SR, max_duration_s=30, max_channels=64).channels == 64
    buf = io.BytesIO()
    sf.write(buf, np.zeros(768_000, np.float32), 768_000, format="WAV", subtype="PCM_16")
    fast = buf.getvalue()
    with pytest.raises(UnsupportedAudio, match=f"up to {MAX_SAMPLE_RATE} Hz"):
        read_audio(fast, SR)
    assert read_audio(fast, SR, max_source_rate=768_000).duration_s == 1.0


_MAXRSS_SCRIPT = textwrap.dedent(
    """
    import json, resource, sys
    from contract.audio import read_audio
    data = open(sys.argv[1], "rb").read()
    read_audio(data[:100_000], 44100)  # libraries loaded, first-call allocations made
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    audio = read_audio(data, 44100)
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"kib": after - before, "n": len(audio.waveform)}))
    """
)


def test_peak_rss_of_a_decode_is_the_output_not_the_input(tmp_path: Path) -> None:
    """ru_maxrss of a fresh process (libsndfile's and soxr's own buffers included): decoding
    20 s of 8 channels at 384 kHz (246 MB as float32 frames x channels; 3.5 MB of output)
    raises the peak by less than 32 MiB."""
    path = tmp_path / "bomb.flac"
    path.write_bytes(flac_silence(20, 384_000, 8))
    env = {k: v for k, v in os.environ.items() if not k.startswith("ESC50_")}
    out = subprocess.run(
        [sys.executable, "-c", _MAXRSS_SCRIPT, str(path)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    seen = json.loads(out.stdout)
    assert seen["n"] == 20 * SR
    assert seen["kib"] < 32 * 1024, f"peak RSS grew {seen['kib'] / 1024:.0f} MiB"


# --- a real server -------------------------------------------------------------------------


def vm_kib(pid: int, field: str) -> int:
    """VmRSS / VmHWM (peak RSS) of a process, in KiB, from /proc/<pid>/status."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1])
    raise AssertionError(f"no {field} in /proc/{pid}/status")


def tone_wav(seconds: float) -> bytes:
    t = np.arange(int(seconds * SR)) / SR
    buf = io.BytesIO()
    sf.write(buf, (0.3 * np.sin(2 * np.pi * 440 * t)).astype(np.float32), SR, format="WAV")
    return buf.getvalue()


@pytest.fixture(scope="module")
def service_process(tiny_onnx: Path, tmp_path_factory) -> Iterator[tuple[str, int]]:
    """`python -m service` on the tiny model: (base URL, pid). Only the ESC50_* set here (an
    ESC50_API_TOKEN in the caller's environment must not guard it)."""
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("ESC50_")}
    env |= {
        "ESC50_MODEL_PATH": str(tiny_onnx),
        "ESC50_HOST": "127.0.0.1",
        "ESC50_PORT": str(port),
        "ESC50_INTRA_OP_THREADS": "1",
        "ESC50_DECODE_WORKERS": "2",
        "ESC50_LOG_LEVEL": "warning",
    }
    log = tmp_path_factory.mktemp("server") / "server.log"
    with log.open("w") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "service"], cwd=REPO, env=env, stdout=out, stderr=out
        )
    base = f"http://127.0.0.1:{port}"
    try:
        wait_ready(base, proc, timeout_s=120, log=log)
        yield base, proc.pid
    finally:
        proc.terminate()
        proc.wait(30)


# Bound on the server's peak RSS growth while it answers the bombs below. Two are accepted
# (8 channels at 48 kHz for 110 s); each holds its output (110 s x 44.1 kHz x 4 B = 19 MiB) and
# its 44 overlapping windows (44 x 220500 x 4 B = 37 MiB), then batches of them: ~60 MiB, which
# glibc keeps resident after free in each thread's arena (up to about twice that in all). The
# refused ones hold one 1 MiB block while decoding, or nothing. 384 MiB = 2 x 2 x 60 MiB plus
# 144 MiB for ONNX Runtime's and the answers' buffers; an honest 110 s mono upload costs about
# as much (loadtests/reports/memory.md). The old reader allocated 1.35 GB for each copy of the
# issue's bomb, so this fails at once if decoding is ever whole-file again.
RSS_GROWTH_BOUND_MIB = 384


def test_a_real_server_answers_bombs_with_bounded_rss(
    service_process: tuple[str, int], issue_bomb: bytes
) -> None:
    base, pid = service_process
    normal = tone_wav(5.0)
    with httpx.Client(base_url=base, timeout=60) as c:  # warm-up: one normal request
        assert c.post("/v1/classify", content=normal, headers={"content-type": "audio/wav"})
    within_budget = flac_silence(110, 48_000, 8)  # 42 M samples: decoded, answered 200
    bombs = {
        "issue bomb 1": (issue_bomb, 413, "audio_too_large"),
        "issue bomb 2": (issue_bomb, 413, "audio_too_large"),
        "8ch 48k 110s 1": (within_budget, 200, None),
        "8ch 48k 110s 2": (within_budget, 200, None),
        "unknown length": (unknown_length(flac_silence(20, 384_000, 8)), 413, "audio_too_large"),
        "wav claiming 4 GiB": (wav_claiming_gigabytes(), 200, None),
    }
    before = vm_kib(pid, "VmHWM")

    def post(body: bytes) -> httpx.Response:
        headers = {"content-type": "audio/flac"}
        return httpx.post(f"{base}/v1/classify", content=body, headers=headers, timeout=120)

    with ThreadPoolExecutor(len(bombs)) as pool:
        answers = dict(zip(bombs, pool.map(post, [b for b, _, _ in bombs.values()]), strict=True))
    grown_mib = (vm_kib(pid, "VmHWM") - before) / 1024
    for name, (_, status, code) in bombs.items():
        r = answers[name]
        assert r.status_code == status, (name, r.text)
        if code is not None:
            assert set(r.json()) == {"error"} and r.json()["error"]["code"] == code, name
    assert answers["8ch 48k 110s 1"].json()["channels"] == 8
    assert grown_mib < RSS_GROWTH_BOUND_MIB, f"peak RSS grew {grown_mib:.0f} MiB"
    r = httpx.post(
        f"{base}/v1/classify", content=normal, headers={"content-type": "audio/wav"}, timeout=60
    )
    assert r.status_code == 200 and r.json()["predictions"]


# --- /v1/explain admits before it reads ------------------------------------------------------


def _start_upload(base: str, declared: int) -> socket.socket:
    """An explain request whose headers and first 16 bytes are sent; the rest never is."""
    host, port = base.removeprefix("http://").split(":")
    s = socket.create_connection((host, int(port)), timeout=10)
    head = (
        f"POST /v1/explain HTTP/1.1\r\nHost: {host}\r\nContent-Type: audio/wav\r\n"
        f"Content-Length: {declared}\r\n\r\n"
    )
    s.sendall(head.encode() + b"RIFF" + bytes(12))
    return s


def _read_answer(s: socket.socket) -> str:
    """What the server sent, up to the end of a JSON error body (or the connection's end)."""
    got = b""
    while not got.endswith(b"}}") and (chunk := s.recv(65536)):
        got += chunk
    return got.decode("latin-1")


def _in_flight(base: str) -> float:
    for line in httpx.get(f"{base}/metrics", timeout=5).text.splitlines():
        if line.startswith("esc50_requests_in_flight "):
            return float(line.split()[1])
    return 0.0


def test_explain_refuses_before_reading_the_body_when_full(
    tiny_onnx: Path, tiny_explain_onnx: Path
) -> None:
    """One place (1 running, 0 waiting). A stalled upload holds it; a second upload is refused
    with 503 while its body is still unsent (the old route read the body first and waited for
    it); once the stalled client goes, the place is free again."""
    settings = Settings(
        model_path=tiny_onnx,
        intra_op_threads=1,
        warmup=False,
        explain_concurrency=1,
        explain_max_queue=0,
    )
    with serve(settings) as base:
        stalled = _start_upload(base, 1_000_000)
        deadline = time.monotonic() + 10
        while _in_flight(base) < 1 and time.monotonic() < deadline:
            time.sleep(0.05)
        refused = _start_upload(base, 1_000_000)
        try:
            refused.settimeout(5)  # the old route waited here for 999,984 more bytes
            head = _read_answer(refused)
            assert head.startswith("HTTP/1.1 503"), head
            assert '"code":"overloaded"' in head and "retry-after" in head.lower()
        finally:
            refused.close()
            stalled.close()
        deadline = time.monotonic() + 10
        while _in_flight(base) > 0 and time.monotonic() < deadline:
            time.sleep(0.05)
        r = httpx.post(
            f"{base}/v1/explain",
            content=tone_wav(5.0),
            headers={"content-type": "audio/wav"},
            timeout=60,
        )
        assert r.status_code == 200, r.text
