"""Overload handled at the front door: `loadtests/serve_lb.py` runs Debian's haproxy with
docker/haproxy/haproxy.cfg in front of real replica processes (`python -m service`, the tiny
model); excess requests wait in HAProxy's queue and are refused there, never by the service;
the bare service's refusal closes the connection instead of reading the unread upload; the
wrk script of `make overload` sends clips and counts answers. Tools that are missing skip."""

from __future__ import annotations

import csv
import io
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest
import soundfile as sf
from servers import clean_env, scrape_metrics, serve

from loadtests import overload
from loadtests.serve_lb import HAPROXY_CFG, free_port_block, local_lb, servers_cfg
from service.settings import Settings

REPO = Path(__file__).resolve().parent.parent
STARTUP_S = 120  # replicas load the tiny model and warm up on a busy 2-core machine

needs_haproxy = pytest.mark.skipif(
    not shutil.which("haproxy"), reason="haproxy not installed (apt-get install haproxy)"
)
needs_wrk = pytest.mark.skipif(
    not shutil.which("wrk"), reason="wrk not installed (apt-get install wrk)"
)


def wav(seconds: float, rate: int = 44100) -> bytes:
    """A tone as 16-bit WAV bytes (10 s at 44.1 kHz: 882 kB, under HAProxy's 1 MiB buffer)."""
    t = np.arange(int(seconds * rate)) / rate
    buf = io.BytesIO()
    sf.write(
        buf,
        (0.3 * np.sin(2 * np.pi * 440 * t)).astype(np.float32),
        rate,
        format="WAV",
        subtype="PCM_16",
    )
    return buf.getvalue()


def children(pid: int) -> list[int]:
    """The processes whose parent is `pid` (from /proc)."""
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            out.append(int(stat.parent.name))
    return out


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def port_free(port: int) -> bool:
    """Nobody listens on `port`: a server could bind it (SO_REUSEADDR, as servers do, so the
    closed connections' TIME_WAIT does not count)."""
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def haproxy_stats(stats_url: str) -> dict[str, dict[str, str]]:
    """HAProxy's stats CSV as {svname: row} for the `api` backend and its servers."""
    text = httpx.get(f"{stats_url};csv", timeout=5).text.lstrip("# ")
    return {r["svname"]: r for r in csv.DictReader(io.StringIO(text)) if r["pxname"] == "api"}


@needs_haproxy
def test_one_haproxy_cfg_for_compose_and_for_local_replicas(tmp_path):
    servers = tmp_path / "servers.cfg"
    servers.write_text(servers_cfg([18001, 18002]))
    compose = subprocess.run(["haproxy", "-c", "-f", str(HAPROXY_CFG)], capture_output=True)
    local = subprocess.run(
        ["haproxy", "-c", "-f", str(HAPROXY_CFG), "-f", str(servers)],
        env={**os.environ, "ESC50_LB_LOCAL": "1", "ESC50_LB_BIND": "127.0.0.1:18000"},
        capture_output=True,
    )
    assert compose.returncode == 0, compose.stderr.decode()
    assert local.returncode == 0, local.stderr.decode()
    # without ESC50_LB_LOCAL the cfg has its own `backend api` (Docker's DNS): two would clash
    both = subprocess.run(
        ["haproxy", "-c", "-f", str(HAPROXY_CFG), "-f", str(servers)], capture_output=True
    )
    assert both.returncode != 0


@needs_haproxy
@pytest.mark.slow
def test_serve_lb_classifies_through_haproxy_and_sigterm_stops_every_process(tmp_path, tiny_onnx):
    port = free_port_block(4)  # the LB, 2 replicas, HAProxy's stats
    log = tmp_path / "serve_lb.log"
    proc = subprocess.Popen(
        [sys.executable, "-m", "loadtests.serve_lb", "--replicas", "2", "--port", str(port)]
        + ["--log-dir", str(tmp_path / "logs")],
        cwd=REPO,
        env=clean_env(ESC50_MODEL_PATH=str(tiny_onnx)),
        stdout=log.open("w"),
        stderr=subprocess.STDOUT,
    )
    try:
        deadline = time.monotonic() + STARTUP_S
        while "Ctrl-C stops them all" not in log.read_text():
            assert proc.poll() is None, f"serve_lb exited: {log.read_text()}"
            assert time.monotonic() < deadline, f"not ready: {log.read_text()}"
            time.sleep(0.2)
        started = children(proc.pid)
        names = sorted(Path(f"/proc/{p}/comm").read_text().strip() for p in started)
        assert names == ["haproxy", "python", "python"], names

        r = httpx.post(
            f"http://127.0.0.1:{port}/v1/classify",
            content=wav(5),
            headers={"Content-Type": "audio/wav"},
            timeout=30,
        )
        assert r.status_code == 200, r.text
        assert r.json()["model"]["name"] == "tiny" and r.json()["predictions"]
        served = haproxy_stats(f"http://127.0.0.1:{port + 3}/stats")
        assert sum(int(served[f"replica{i}"]["stot"]) for i in (1, 2)) >= 1, served

        proc.send_signal(signal.SIGTERM)
        code = proc.wait(60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert code == 0, log.read_text()
    assert "serve-lb: stopped" in log.read_text()
    assert [p for p in started if alive(p)] == [], "stray processes after SIGTERM"
    assert all(port_free(port + i) for i in range(4)), "a port is still taken"


@needs_haproxy
@pytest.mark.slow
def test_excess_requests_wait_in_haproxy_and_are_refused_there_never_by_the_service(
    tmp_path, tiny_onnx
):
    # One request at a time on the replica (maxconn 1, batches of one); 48 at once, so most of
    # them queue in HAProxy, and the ones still queued after 100 ms are refused by HAProxy.
    env = clean_env(ESC50_MODEL_PATH=str(tiny_onnx), ESC50_MAX_BATCH_SIZE="1")
    body = wav(10)
    port = free_port_block(3)
    with local_lb(
        1, port, env=env, maxconn=1, queue_timeout="100ms", log_dir=tmp_path, startup_s=STARTUP_S
    ) as lb:
        log_start = (lb.log_dir / "haproxy.log").stat().st_size

        def send(_: int) -> tuple[int, str]:
            r = httpx.post(
                f"{lb.url}/v1/classify",
                content=body,
                headers={"Content-Type": "audio/wav"},
                timeout=60,
            )
            return r.status_code, r.text

        with ThreadPoolExecutor(48) as pool:
            results = list(pool.map(send, range(48)))
        stats = haproxy_stats(lb.stats_url)
        rejected = scrape_metrics(lb.replicas[0])
    statuses = [s for s, _ in results]
    assert set(statuses) <= {200, 503}, statuses
    assert statuses.count(200) >= 1, statuses
    assert int(stats["BACKEND"]["qmax"]) >= 2, "requests must have waited in HAProxy's queue"
    assert int(stats["replica1"]["smax"]) == 1, "the replica never had more than maxconn"
    refused = [text for s, text in results if s == 503]
    assert refused, "some requests must have waited past the queue timeout"
    # HAProxy's own 503 page, not the service's JSON error
    assert all("No server is available" in text for text in refused), refused[:1]
    by_service = {k: v for k, v in rejected.items() if k.startswith("esc50_requests_rejected")}
    assert sum(by_service.values()) == 0, by_service
    # make overload's reading of HAProxy's log agrees with what the clients saw
    view = overload.lb_log_view(lb.log_dir / "haproxy.log", log_start)
    assert view["refused_by_lb"] == len(refused) and view["refused_by_replica"] == 0, view
    assert view["accepted_latency_ms"]["p99"] is not None


def test_bare_service_refusal_closes_the_connection_instead_of_reading_the_upload(tiny_onnx):
    settings = Settings(model_path=tiny_onnx, max_queue_size=1, warmup=False)
    head = (
        b"POST /v1/classify HTTP/1.1\r\nHost: esc50\r\nContent-Type: audio/wav\r\n"
        b"Content-Length: 441044\r\n\r\n"
    )
    with serve(settings) as base:
        address = ("127.0.0.1", int(base.rsplit(":", 1)[1]))
        # admitted before its body is read: this stalled upload holds the only queue place
        with socket.create_connection(address) as holder:
            holder.sendall(head + b"RIFF")
            time.sleep(0.5)
            with socket.create_connection(address, timeout=10) as refused:
                refused.sendall(head)  # the body never comes: only a close ends this answer
                answer = b""
                while chunk := refused.recv(65536):  # a kept-alive connection times out here
                    answer += chunk
    head_text, _, body = answer.partition(b"\r\n\r\n")
    lines = head_text.decode().lower().split("\r\n")
    assert lines[0].startswith("http/1.1 503"), lines
    assert "connection: close" in lines, lines
    assert json.loads(body)["error"]["code"] == "overloaded"


@needs_wrk
def test_overload_lua_sends_every_clip_and_counts_the_answers(tmp_path, tiny_onnx):
    clips = tmp_path / "clips.txt"
    for i, seconds in enumerate((1, 2, 5)):
        (tmp_path / f"{i}.wav").write_bytes(wav(seconds, 16000))
    clips.write_text("".join(f"{tmp_path / f'{i}.wav'}\n" for i in range(3)))
    with serve(Settings(model_path=tiny_onnx, warmup=False)) as base:
        before = scrape_metrics(base)
        result = overload.wrk(base, connections=2, seconds=1, clips=clips, threads=1)
        after = scrape_metrics(base)
    assert result["requests"] >= 3 and result["statuses"] == {"200": result["requests"]}, result

    def classified(metrics: dict[str, float]) -> float:
        return sum(
            v
            for k, v in metrics.items()
            if k.startswith("esc50_http_requests_total{")
            and 'route="/v1/classify"' in k
            and 'status="200"' in k
        )

    served = classified(after) - classified(before)
    assert served >= result["requests"], (served, result)
    assert result["latency_ms"]["p99"] > 0
