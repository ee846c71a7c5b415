"""The Locust load test: its clip pool and checks, and short real headless runs against a real
service (uvicorn on loopback, the tiny exported model) that pass and fail the SLO gate."""

from __future__ import annotations

import csv
import importlib.util
import io
import subprocess
import sys
from pathlib import Path

import pytest
import soundfile as sf

REPO = Path(__file__).resolve().parent.parent
LOCUSTFILE = REPO / "loadtests" / "locustfile.py"
LOCUST = Path(sys.executable).with_name("locust")

# Only looked up, never imported here: importing Locust monkey-patches the whole test process.
pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("locust") is None or not LOCUST.exists(),
    reason="Locust not installed (pip install .[loadtest])",
)


@pytest.fixture(scope="module")
def traffic():
    """loadtests/traffic.py, imported here; the locustfile itself only in a subprocess, because
    importing Locust monkey-patches threads and sockets (gevent) for the whole process."""
    spec = importlib.util.spec_from_file_location(
        "esc50_traffic", LOCUSTFILE.with_name("traffic.py")
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def test_locustfile_loads():
    out = subprocess.run(
        [str(LOCUST), "-f", str(LOCUSTFILE), "--list"],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=REPO,
    )
    assert out.returncode == 0 and "ServiceUser" in out.stdout, out.stderr[-2000:]


@pytest.fixture(scope="module")
def clips(traffic):
    return traffic.load_clips()


def test_clip_pool_mixes_formats_rates_and_lengths(clips):
    assert clips["real"] and clips["other"] and clips["long"]
    infos = [sf.info(io.BytesIO(c.body)) for kind in clips.values() for c in kind]
    assert {i.format for i in infos} >= {"WAV", "FLAC", "OGG"}
    assert len({i.samplerate for i in infos}) >= 3 and {i.channels for i in infos} == {1, 2}
    assert all(i.duration > 5.5 for i in (sf.info(io.BytesIO(c.body)) for c in clips["long"]))


def test_bundled_clips_stay_small():
    sizes = [p.stat().st_size for p in (REPO / "loadtests" / "clips").iterdir()]
    assert sizes and sum(sizes) < 400_000


def test_generated_wav_decodes(traffic):
    data, sr = sf.read(io.BytesIO(traffic.make_wav(1.5, 16000, channels=2)))
    assert sr == 16000 and data.shape == (24000, 2)


def test_multipart_body_is_parsable(traffic):
    from python_multipart import MultipartParser  # a serving dependency

    body, ctype = traffic.multipart_body("file", "a.wav", b"RIFFxxxx", "audio/wav")
    boundary = ctype.split("boundary=")[1]
    parts = []
    MultipartParser(boundary, {"on_part_data": lambda d, s, e: parts.append(d[s:e])}).write(body)
    assert b"".join(parts) == b"RIFFxxxx"


class FakeResponse:
    def __init__(self, doc):
        self.doc = doc

    def json(self):
        return self.doc


@pytest.mark.parametrize(
    ("doc", "problem"),
    [
        ({"predictions": [{"label": "dog", "probability": 0.9}], "windows": 1}, None),
        ({"predictions": [], "windows": 1}, "predictions"),
        (
            {
                "predictions": [
                    {"label": "a", "probability": 0.1},
                    {"label": "b", "probability": 0.8},
                ],
                "windows": 1,
            },
            "most probable first",
        ),
        ({"predictions": [{"label": "a", "probability": 1.5}], "windows": 1}, "outside"),
        ({"predictions": [{"label": "a", "probability": 0.5}], "windows": 3}, "timeline"),
    ],
)
def test_check_prediction(traffic, doc, problem):
    found = traffic.check_prediction(FakeResponse(doc), top_k=5)
    assert found is None if problem is None else problem in found


# --- real runs -----------------------------------------------------------------------------


def run_locust(base: str, tmp_path: Path, seconds: int, *extra: str) -> subprocess.CompletedProcess:
    cmd = [
        str(LOCUST),
        "-f",
        str(LOCUSTFILE),
        "--headless",
        "--host",
        base,
        "--users",
        "3",
        "--spawn-rate",
        "3",
        "--run-time",
        f"{seconds}s",
        "--stop-timeout",
        "5",
        "--csv",
        str(tmp_path / "run"),
        "--only-summary",
        *extra,
    ]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=60, cwd=REPO)


@pytest.fixture(scope="module")
def service_url(tiny_onnx):
    from servers import serve

    from service.settings import Settings

    with serve(Settings(model_path=tiny_onnx, max_batch_size=4, max_wait_ms=2)) as base:
        yield base


@pytest.mark.slow
def test_headless_run_passes_the_slo(service_url, tmp_path):
    out = run_locust(service_url, tmp_path, 6, "--slo-p95-ms", "10000")
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    with open(tmp_path / "run_stats.csv") as f:
        rows = {r["Name"]: r for r in csv.DictReader(f)}
    total = rows["Aggregated"]
    assert int(total["Request Count"]) > 5 and int(total["Failure Count"]) == 0
    assert any(name.startswith("/classify [") for name in rows)


@pytest.mark.slow
def test_headless_run_fails_a_missed_slo(service_url, tmp_path):
    out = run_locust(service_url, tmp_path, 3, "--slo-p95-ms", "0.001")
    assert out.returncode == 1
    assert "SLO MISS: p95" in out.stderr
