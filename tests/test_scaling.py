"""Chaos on the real process (`python -m service`, the shipped int8 model, real clips): SIGTERM
under load answers every request already in flight with its result (200: the drain finishes
them; no 503, no other 5xx, no dropped connection) and exits; a corrupt, truncated or missing
model file stops the process with a clear error before it ever listens. The replica/load-balancer
kill test is docker/smoke-replicas.sh (CI: make docker-smoke-replicas); overload at the load
balancer is tests/test_overload.py."""

from __future__ import annotations

import io
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
import soundfile as sf
from servers import free_port, wait_ready

REPO = Path(__file__).resolve().parent.parent
MODEL = REPO / "models" / "esc50-resnet34.int8.onnx"
STARTUP_S = 90  # model load + warm-up on a busy 2-core machine


def start(tmp_path: Path, **env: str) -> tuple[subprocess.Popen, str, Path]:
    port = free_port()
    log = tmp_path / "service.log"
    full_env = {**os.environ, "ESC50_HOST": "127.0.0.1", "ESC50_PORT": str(port), **env}
    proc = subprocess.Popen(
        [sys.executable, "-m", "service"],
        cwd=REPO,
        env=full_env,
        stdout=log.open("w"),
        stderr=subprocess.STDOUT,
    )
    return proc, f"http://127.0.0.1:{port}", log


def long_wav(seconds: float, rate: int = 16000) -> bytes:
    """A tone as 16-bit WAV bytes (60 s at 16 kHz: 1.9 MB, 23 windows)."""
    t = np.arange(int(seconds * rate)) / rate
    buf = io.BytesIO()
    sf.write(buf, (0.3 * np.sin(2 * np.pi * 440 * t)).astype(np.float32), rate, format="WAV")
    return buf.getvalue()


def in_flight(base: str) -> float:
    for line in httpx.get(f"{base}/metrics", timeout=5).text.splitlines():
        if line.startswith("esc50_requests_in_flight "):
            return float(line.split()[1])
    return 0.0


needs_model = pytest.mark.skipif(not MODEL.is_file(), reason="no shipped int8 model")


@needs_model
@pytest.mark.slow
def test_sigterm_under_load_answers_every_request_in_flight(tmp_path):
    # Batches of one and minute-long clips: 12 x 23 windows queue for seconds, so every request
    # is inside the service when SIGTERM lands, however fast the engine is.
    proc, base, log = start(
        tmp_path,
        ESC50_MAX_BATCH_SIZE="1",
        ESC50_MAX_QUEUE_SIZE="1000",  # admit all of them: this test is about draining,
        ESC50_MAX_QUEUE_WAIT_S="120",  # not about load shedding
        ESC50_LOG_LEVEL="info",
    )
    try:
        wait_ready(base, proc, STARTUP_S, log)
        body = long_wav(seconds=60)
        n = 12
        results: list[object] = [None] * n

        def send(i: int) -> None:
            try:
                r = httpx.post(
                    f"{base}/classify",
                    content=body,
                    headers={"Content-Type": "audio/wav"},
                    timeout=60,
                )
                results[i] = r.status_code
            except httpx.TransportError as e:
                results[i] = repr(e)

        threads = [threading.Thread(target=send, args=(i,)) for i in range(n)]
        for t in threads:
            t.start()
        deadline = time.monotonic() + 20
        while in_flight(base) < n and time.monotonic() < deadline:
            time.sleep(0.05)
        assert in_flight(base) == n, "all requests must be inside the service before SIGTERM"
        proc.send_signal(signal.SIGTERM)
        for t in threads:
            t.join(60)
        code = proc.wait(45)  # ESC50_DRAIN_TIMEOUT_S (30 s) + margin
    finally:
        if proc.poll() is None:
            proc.kill()
    text = log.read_text()
    # every request was inside the service before SIGTERM: the drain answers them all
    assert results == [200] * n, f"{results}\n{text[-3000:]}"
    # uvicorn re-raises SIGTERM after its graceful shutdown, so "killed by SIGTERM" is the
    # normal end here; what matters is that the shutdown ran to completion.
    assert code in (0, -signal.SIGTERM), code
    assert "Application shutdown complete" in text and "service: stopped" in text


@needs_model
@pytest.mark.parametrize("case", ["corrupt", "truncated", "missing"])
def test_broken_model_file_stops_the_service_with_a_clear_error(tmp_path, case):
    bad = tmp_path / "esc50-resnet34.int8.onnx"
    if case == "corrupt":
        bad.write_bytes(os.urandom(200_000))
    elif case == "truncated":
        bad.write_bytes(MODEL.read_bytes()[: MODEL.stat().st_size // 2])
    proc, base, log = start(tmp_path, ESC50_MODEL_PATH=str(bad))
    try:
        code = proc.wait(STARTUP_S)
    finally:
        if proc.poll() is None:
            proc.kill()
    text = log.read_text()
    assert code != 0, text
    assert "Uvicorn running" not in text, "it must never listen with a broken model"
    if case == "missing":
        assert f"esc50 service: ESC50_MODEL_PATH={bad} is not a file" in text
        assert "Traceback" not in text
    else:
        assert str(bad) in text and "Protobuf parsing failed" in text
        assert "Application startup failed" in text
