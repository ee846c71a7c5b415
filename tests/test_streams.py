"""Live streams over a WebSocket (service/streams.py) against a real uvicorn: windows equal
/v1/classify's answer for the same 5 s, chunking changes nothing, limits close with the
documented codes (docs/streams.md), a vanished client frees everything, shutdown drains."""

from __future__ import annotations

import base64
import csv
import io
import json
import shutil
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

import httpx
import numpy as np
import pytest
import soundfile as sf
import uvicorn
from servers import poll_ready, scrape_metrics
from websockets.exceptions import ConnectionClosed, InvalidStatus
from websockets.sync.client import ClientConnection, connect

from contract.audio import read_audio
from service.app import create_app
from service.settings import Settings
from service.streams import DrainingServer

SR = 44100
TOKEN = "s3cret/with=odd+chars"  # not a subprotocol token as is: the base64url form carries it
AUTH = {"Authorization": f"Bearer {TOKEN}"}
SHIPPED = Path(__file__).resolve().parent.parent / "models" / "esc50-resnet34.int8.onnx"


@contextmanager
def serve_app(settings: Settings) -> Iterator[tuple[str, object, DrainingServer]]:
    """servers.serve with the draining server (as `python -m service` runs), yielding the app
    and the server too: the tests look at `app.state.streams` and trigger the shutdown."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    base = f"http://127.0.0.1:{sock.getsockname()[1]}"
    app = create_app(settings)
    server = DrainingServer(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        poll_ready(base, lambda: None if thread.is_alive() else "the server thread died", 60)
        yield base, app, server
    finally:
        server.should_exit = True
        thread.join(30)
        sock.close()


def settings_for(model: Path, **kw) -> Settings:
    base = dict(
        model_path=model,
        intra_op_threads=1,
        max_batch_size=8,
        api_token=TOKEN,
        stream_max_open=3,
        stream_max_frame_bytes=256 * 1024,
        stream_idle_timeout_s=2.0,
    )
    return Settings(**{**base, **kw})


@pytest.fixture(scope="module")
def model(request) -> Path:
    """The shipped int8 model where committed (labels mean something), else the tiny one."""
    return SHIPPED if SHIPPED.is_file() else request.getfixturevalue("tiny_onnx")


@pytest.fixture(scope="module")
def server(model: Path) -> Iterator[tuple[str, object]]:
    with serve_app(settings_for(model)) as (base, app, _):
        yield base, app


def ws_url(base: str, path: str = "/v1/stream") -> str:
    return base.replace("http://", "ws://") + path


@contextmanager
def open_stream(base: str, config: dict, **kw) -> Iterator[ClientConnection]:
    """A stream past its config: the `start` event has come."""
    with connect(ws_url(base), additional_headers=kw.pop("headers", AUTH), **kw) as ws:
        ws.send(json.dumps(config))
        start = json.loads(ws.recv(timeout=30))
        assert start["type"] == "start", start
        yield ws


def run_stream(base: str, pcm: bytes, config: dict, chunk_bytes: int) -> list[dict]:
    """Send `pcm` in chunks, then end; every event after `start`, up to the final one."""
    with open_stream(base, config) as ws:
        for i in range(0, len(pcm), chunk_bytes):
            ws.send(pcm[i : i + chunk_bytes])
        ws.send(json.dumps({"type": "end"}))
        events = [json.loads(m) for m in ws]  # until the server closes
        assert ws.close_code == 1000, (ws.close_code, ws.close_reason)
    assert events[-1]["type"] == "end", events[-1]
    return events


def closed_with(ws: ClientConnection) -> tuple[int | None, dict]:
    """Read to the close; the close code and the `error` event sent before it."""
    events = []
    with pytest.raises(ConnectionClosed):
        while True:
            events.append(json.loads(ws.recv(timeout=30)))
    errors = [e for e in events if e["type"] == "error"]
    return ws.close_code, errors[-1] if errors else {}


def classify_wav(base: str, wav: bytes) -> dict:
    r = httpx.post(
        f"{base}/v1/classify",
        content=wav,
        params={"top_k": 5},
        headers={**AUTH, "content-type": "audio/wav"},
        timeout=60,
    )
    assert r.status_code == 200, r.text
    return r.json()


def pcm16_wav(x: np.ndarray, sr: int = SR) -> bytes:
    buf = io.BytesIO()
    sf.write(buf, x, sr, format="WAV", subtype="PCM_16")
    return buf.getvalue()


def to_int16(x: np.ndarray) -> np.ndarray:
    return np.clip(np.round(x * 32767), -32768, 32767).astype("<i2")


def metric(base: str, series: str) -> float:
    return scrape_metrics(base).get(series, 0.0)


# --- the clips ---------------------------------------------------------------------------------


def esc50_clips(base: str, n: int) -> tuple[list[np.ndarray], list[str]]:
    """`n` real ESC-10 clips of different classes that /v1/classify labels correctly (the
    stream is tested against /v1/classify, not the model's accuracy); skip without them."""
    from conftest import ESC50

    meta = ESC50 / "meta" / "esc50.csv"
    if not SHIPPED.is_file() or not meta.is_file():
        pytest.skip("needs the shipped model and ESC-50 clips (../shared or ESC50_ROOT)")
    present = {p.stem: p for p in (ESC50 / "audio").iterdir()}
    clips, labels = [], []
    for row in sorted(csv.DictReader(meta.open()), key=lambda r: r["filename"]):
        path = present.get(Path(row["filename"]).stem)
        if path is None or row["esc10"] != "True" or row["category"] in labels:
            continue
        x = read_audio(path).waveform[: 5 * SR]
        x = np.pad(x, (0, 5 * SR - len(x)))
        top = classify_wav(base, pcm16_wav(x))["predictions"][0]["label"]
        if top == row["category"] and np.abs(x).max() > 0.05:
            clips.append(x)
            labels.append(top)
        if len(clips) == n:
            return clips, labels
    pytest.skip(f"found {len(clips)} of {n} clips the model labels correctly")


def noise(seconds: float, sr: int, seed: int, channels: int = 1) -> np.ndarray:
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * sr)) / sr
    x = 0.2 * np.sin(2 * np.pi * (300 + 400 * t) * t) + 0.05 * rng.standard_normal(len(t))
    x = x.astype(np.float32)
    return np.stack([x, np.roll(x, 100)], axis=1) if channels == 2 else x


# --- what the windows say ----------------------------------------------------------------------


def test_windows_follow_the_clips_and_equal_classify(server) -> None:
    """Three clips of different classes, one after the other: every window's event equals
    /v1/classify's answer for the same 5 s posted as a WAV (labels, probabilities, model), and
    the windows aligned with a clip carry its label. A second, real-time stream runs alongside
    and /v1/classify keeps answering while both are open."""
    base, _ = server
    clips, labels = esc50_clips(base, 3)
    pcm = to_int16(np.concatenate(clips))  # 15 s
    background = threading.Thread(target=_realtime_stream, args=(base, 7.0), daemon=True)
    background.start()
    events = run_stream(base, pcm.tobytes(), {"sample_rate": SR, "hop_s": 1.0, "top_k": 5}, 8820)
    windows = [e for e in events if e["type"] == "window"]
    assert [(w["start_s"], w["end_s"]) for w in windows] == [(s, s + 5.0) for s in range(11)]
    assert events[-1] == {
        "type": "end",
        "windows": 11,
        "skipped": 0,
        "audio_s": 15.0,
        "reason": "end of stream",
    }
    for w in windows:
        a = round(w["start_s"] * SR)
        answer = classify_wav(base, pcm16_wav(pcm[a : a + 5 * SR]))  # streams are still open
        assert w["predictions"] == answer["predictions"], w["start_s"]
        assert w["model"] == answer["model"] and w["skipped"] == 0
    assert [windows[i]["predictions"][0]["label"] for i in (0, 5, 10)] == labels
    background.join(30)
    assert not background.is_alive()


def _realtime_stream(base: str, seconds: float) -> None:
    x = to_int16(noise(seconds, 16000, seed=5))
    with open_stream(base, {"sample_rate": 16000, "hop_s": 0.5}) as ws:
        for i in range(0, len(x), 1600):  # 0.1 s at a time, at real time
            ws.send(x[i : i + 1600].tobytes())
            time.sleep(0.1)
        ws.send(json.dumps({"type": "end"}))
        assert [json.loads(m) for m in ws][-1]["windows"] == 5


@pytest.mark.parametrize(
    ("encoding", "channels", "rate"),
    [("pcm_s16le", 1, 8000), ("pcm_f32le", 2, 11025)],
)
def test_chunk_sizes_give_identical_events(server, encoding: str, channels: int, rate: int) -> None:
    """From one sample (and splits inside a sample) to one second per message: the same
    events, to the last bit. The stream is resampled, so the resampler's state is exercised."""
    base, _ = server
    seconds = 6.0 if channels == 1 else 5.7
    x = noise(seconds, rate, seed=1, channels=channels)
    pcm = (to_int16(x) if encoding == "pcm_s16le" else x.astype("<f4")).tobytes()
    frame = (2 if encoding == "pcm_s16le" else 4) * channels
    config = {"sample_rate": rate, "channels": channels, "encoding": encoding, "hop_s": 0.3}
    one_second = rate * frame
    sizes = [one_second, 997 * frame, 1001, frame] if channels == 1 else [one_second, 13, frame]
    results = [run_stream(base, pcm, config, size) for size in sizes]
    assert len([e for e in results[0] if e["type"] == "window"]) == (4 if channels == 1 else 3)
    for size, events in zip(sizes[1:], results[1:], strict=True):
        assert events == results[0], f"{size}-byte messages"


# --- limits and close codes -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("first", "code", "says"),
    [
        ("not json", 1007, "bad config"),
        (json.dumps({"sample_rate": 16000, "bits": 24}), 1007, "bits"),
        (json.dumps({"encoding": "pcm_mulaw"}), 1007, "encoding"),
        (json.dumps({"channels": 6}), 1007, "channels"),
        (json.dumps({"hop_s": 0.01}), 1007, "hop_s"),
        (json.dumps({"sample_rate": 10_000_000}), 1007, "sample_rate"),
        (b"\x00\x01" * 100, 1003, "first message must be the JSON config"),
    ],
)
def test_bad_first_message(server, first, code: int, says: str) -> None:
    base, _ = server
    with connect(ws_url(base), additional_headers=AUTH) as ws:
        ws.send(first)
        got, error = closed_with(ws)
    assert got == code and says in ws.close_reason and error["code"] == code, ws.close_reason


def test_oversize_frame_and_stray_text(server) -> None:
    base, _ = server
    with open_stream(base, {"sample_rate": 16000}) as ws:
        ws.send(b"\x00" * (256 * 1024 + 2))
        assert closed_with(ws)[0] == 1009 and "limit is 262144" in ws.close_reason
    with open_stream(base, {"sample_rate": 16000}) as ws:
        ws.send(json.dumps({"type": "pause"}))
        assert closed_with(ws)[0] == 1003


def test_auth_unknown_model_and_idle(server) -> None:
    base, _ = server
    for headers in ({}, {"Authorization": "Bearer wrong"}):
        with connect(ws_url(base), additional_headers=headers) as ws:
            assert closed_with(ws)[0] == 1008 and "unauthorized" in ws.close_reason
    # browsers: the token as a subprotocol, base64url without padding, beside esc50-stream
    encoded = base64.urlsafe_b64encode(TOKEN.encode()).decode().rstrip("=")
    protocols = ["esc50-stream", f"bearer.{encoded}"]
    with open_stream(base, {}, headers={}, subprotocols=protocols) as ws:
        assert ws.subprotocol == "esc50-stream"
    with connect(ws_url(base, "/v1/models/nope/stream"), additional_headers=AUTH) as ws:
        assert closed_with(ws)[0] == 4404
    with open_stream(base, {"sample_rate": 16000}) as ws:
        t0 = time.monotonic()
        assert closed_with(ws)[0] == 4408 and 1.5 < time.monotonic() - t0 < 10


def test_too_many_streams_then_a_slot_frees(server) -> None:
    base, _ = server
    with ExitStack() as held:
        streams = [held.enter_context(open_stream(base, {})) for _ in range(3)]
        with connect(ws_url(base), additional_headers=AUTH) as ws:
            assert closed_with(ws)[0] == 1013 and "too many open streams (3)" in ws.close_reason
        streams[0].close()
        deadline = time.monotonic() + 10
        while metric(base, "esc50_streams_open") > 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        held.enter_context(open_stream(base, {}))  # the freed slot is usable


def test_a_client_that_disappears_frees_everything(server) -> None:
    """The socket drops (no close frame) while windows are being scored: the slot, the tasks
    and the queued jobs go; the open-streams gauge is back to 0."""
    base, app = server
    settle(app)  # the streams of earlier tests are gone
    vanished = metric(base, 'esc50_streams_closed_total{code="1006"}')
    with open_stream(base, {"sample_rate": 16000, "hop_s": 0.25}) as ws:
        x = to_int16(noise(20.0, 16000, seed=2)).tobytes()
        for i in range(0, len(x), 32000):
            ws.send(x[i : i + 32000])
        ws.socket.shutdown(socket.SHUT_RDWR)  # gone, mid-stream, no goodbye
        ws.socket.close()
    settle(app)
    assert not app.state.streams.tasks and not app.state.streams.sessions
    assert metric(base, "esc50_streams_open") == 0
    assert metric(base, 'esc50_streams_closed_total{code="1006"}') == vanished + 1
    assert sum(v for k, v in scrape_metrics(base).items() if k.startswith("esc50_queue_depth")) == 0


def settle(app, timeout_s: float = 15) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and (app.state.streams.tasks or app.state.streams.sessions):
        time.sleep(0.05)


def test_metrics_count_windows_and_latency(server) -> None:
    base, _ = server
    before = metric(base, 'esc50_stream_windows_total{outcome="scored"}')
    count = metric(base, "esc50_stream_window_latency_seconds_count")
    run_stream(base, to_int16(noise(6.0, 16000, 3)).tobytes(), {"sample_rate": 16000}, 3200)
    assert metric(base, 'esc50_stream_windows_total{outcome="scored"}') == before + 2
    assert metric(base, "esc50_stream_window_latency_seconds_count") == count + 2


def test_shutdown_sends_a_final_event_and_1012(model: Path) -> None:
    with (
        serve_app(settings_for(model)) as (base, _, server),
        open_stream(base, {"sample_rate": 16000, "hop_s": 0.5}) as ws,
    ):
        ws.send(to_int16(noise(6.2, 16000, seed=4)).tobytes())  # windows end 5, 5.5, 6
        first = json.loads(ws.recv(timeout=30))
        assert first["type"] == "window"
        server.should_exit = True  # as SIGTERM does
        events = [first]
        with pytest.raises(ConnectionClosed):
            while True:
                events.append(json.loads(ws.recv(timeout=30)))
    assert ws.close_code == 1012, (ws.close_code, ws.close_reason)
    final = events[-1]
    assert final["type"] == "closing" and final["reason"].startswith("service restart")
    assert final["windows"] == len([e for e in events if e["type"] == "window"]) == 3


def test_the_client_prints_the_events(server, tmp_path: Path, capsys) -> None:
    from service import stream

    base, _ = server
    wav = tmp_path / "stereo.wav"
    sf.write(wav, noise(6.5, 16000, seed=6, channels=2), 16000, subtype="PCM_16")
    argv = [str(wav), "--url", ws_url(base), "--fast", "--hop", "1", "--token", TOKEN]
    assert stream.main(argv) == 0
    out, err = capsys.readouterr()
    lines = out.splitlines()
    assert lines[0].startswith("model ") and "5 s windows every 1 s" in lines[0]
    assert [line.split(" s ")[0].strip() for line in lines[1:3]] == ["0.00-   5.00", "1.00-   6.00"]
    assert lines[-1] == "end: 2 windows, 0 skipped, 6.5 s" and "closed: 1000" in err


# --- through the load balancer ------------------------------------------------------------------


@pytest.mark.skipif(shutil.which("haproxy") is None, reason="needs Debian's haproxy")
def test_a_stream_through_haproxy_gives_the_direct_events(server, model: Path, tmp_path: Path):
    """docker/haproxy/haproxy.cfg routes /v1/stream to its own backend (the tunnel outlives the
    classify timeouts): the events through the LB equal those straight from a replica."""
    from loadtests.local import clean_env, free_port
    from loadtests.serve_lb import local_lb

    base, _ = server
    x = noise(7.0, 16000, seed=3)
    pcm = to_int16(x).tobytes()
    config = {"sample_rate": 16000, "channels": 1, "encoding": "pcm_s16le", "hop_s": 1.0}
    env = clean_env(ESC50_MODEL_PATH=str(model), ESC50_API_TOKEN=TOKEN, ESC50_INTRA_OP_THREADS="1")
    with local_lb(1, free_port(), env=env, log_dir=tmp_path) as lb:
        # the streams backend runs its own health checks: up a check interval after `api`
        for _ in range(50):
            try:
                through = run_stream(lb.url, pcm, config, 3200)
                break
            except InvalidStatus as e:
                assert e.response.status_code == 503, e
                time.sleep(0.2)
        log = (lb.log_dir / "haproxy.log").read_text()
    direct = run_stream(base, pcm, config, 3200)
    strip = [{k: v for k, v in e.items() if k != "latency_s"} for e in through]
    assert [e["type"] for e in through].count("window") == 3
    assert strip == [{k: v for k, v in e.items() if k != "latency_s"} for e in direct]
    assert "streams/replica1" in log, log[-2000:]


def test_a_saturated_service_skips_windows_and_says_so(tiny_onnx: Path) -> None:
    """When the batcher refuses a stream's windows (its queue is full of uploads), the stream
    stays open: those windows are skipped, the next event counts them, the end says how many."""
    from servers import serve

    from service.backends import load_backend

    class Slow:  # the real tiny model, 0.3 s per batch: uploads keep the one queue place taken
        def __init__(self, inner) -> None:
            self.inner, self.metadata = inner, inner.metadata
            self.name, self.provider, self.max_batch_size = inner.name, inner.provider, None

        def predict(self, x):
            time.sleep(0.3)
            return self.inner.predict(x)

        def close(self) -> None:
            self.inner.close()

    settings = Settings(
        model_path=tiny_onnx, intra_op_threads=1, max_queue_size=1, warmup=False, max_wait_ms=0
    )
    upload = io.BytesIO()
    sf.write(upload, noise(5.0, SR, seed=4), SR, format="WAV", subtype="PCM_16")
    stop = threading.Event()

    def uploads(base: str) -> None:
        with httpx.Client(timeout=30) as c:
            while not stop.is_set():
                c.post(f"{base}/v1/classify", content=upload.getvalue())

    with serve(settings, lambda s, p: Slow(load_backend(s, p))) as base:
        senders = [threading.Thread(target=uploads, args=(base,)) for _ in range(4)]
        for t in senders:
            t.start()
        try:
            pcm = to_int16(noise(12.0, SR, seed=5)).tobytes()
            config = {"sample_rate": SR, "channels": 1, "encoding": "pcm_s16le", "hop_s": 0.5}
            with connect(ws_url(base)) as ws:
                ws.send(json.dumps(config))
                assert json.loads(ws.recv(timeout=30))["type"] == "start"
                for i in range(0, len(pcm), SR // 5 * 2):  # 0.2 s messages, at real time
                    ws.send(pcm[i : i + SR // 5 * 2])
                    time.sleep(0.2)
                ws.send(json.dumps({"type": "end"}))
                events = [json.loads(m) for m in ws]
                code = ws.close_code
        finally:
            stop.set()
            for t in senders:
                t.join(30)
    windows, end = [e for e in events if e["type"] == "window"], events[-1]
    assert code == 1000 and end["type"] == "end", (code, end)
    assert end["skipped"] > 0, "the full queue must have refused some windows"
    assert end["windows"] + end["skipped"] == 15  # 12 s at hop 0.5: windows at 0 .. 7 s
    assert sum(e["skipped"] for e in windows) <= end["skipped"]
