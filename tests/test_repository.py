"""The model repository: versions on disk, policies, and swaps, rollbacks and failed loads under
load through the control API that tritonclient speaks (a real uvicorn server, real ONNX Runtime
sessions, real audio)."""

from __future__ import annotations

import io
import json
import os
import shutil
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
import soundfile as sf
from servers import scrape_metrics, serve

from service.repository import RepositorySource, VersionPolicy, resident_bytes
from service.settings import Settings

ADMIN = "repository-admin-token"
ADMIN_HEADERS = {"authorization": f"Bearer {ADMIN}"}
SHIPPED = Path(__file__).resolve().parent.parent / "models" / "esc50-resnet34.int8.onnx"


def wav(seconds: float = 5.0, seed: int = 0) -> bytes:
    rng = np.random.default_rng(seed)
    t = np.arange(int(44100 * seconds)) / 44100
    x = 0.2 * np.sin(2 * np.pi * rng.uniform(200, 4000) * t) + 0.05 * rng.standard_normal(len(t))
    buf = io.BytesIO()
    sf.write(buf, x.astype(np.float32), 44100, format="WAV", subtype="PCM_16")
    return buf.getvalue()


def publish(repo: Path, name: str, version: int, artifact: Path | bytes) -> Path:
    """As a publisher does: write a hidden folder, then rename it into place (atomic)."""
    tmp = repo / name / f".tmp-{version}"
    tmp.mkdir(parents=True)
    if isinstance(artifact, bytes):
        (tmp / "model.onnx").write_bytes(artifact)
    else:
        shutil.copy(artifact, tmp / "model.onnx")
    final = repo / name / str(version)
    os.rename(tmp, final)
    return final


# --- on disk -----------------------------------------------------------------------------------


def test_version_policies_select_like_triton() -> None:
    available = [1, 2, 5, 7]
    assert VersionPolicy.parse("latest:1").select(available) == [7]
    assert VersionPolicy.parse("latest:2").select(available) == [5, 7]
    assert VersionPolicy.parse("all").select(available) == available
    assert VersionPolicy.parse("specific:2,5,9").select(available) == [2, 5]
    triton = {"version_policy": {"specific": {"versions": [1]}}}
    assert VersionPolicy.from_triton(triton) == VersionPolicy.parse("specific:1")
    latest = {"version_policy": {"latest": {"num_versions": 3}}}
    assert VersionPolicy.from_triton(latest) == VersionPolicy.parse("latest:3")
    for bad in ("latest:0", "newest", "specific:", "latest:-1"):
        with pytest.raises(ValueError):
            VersionPolicy.parse(bad)


def test_only_numbered_complete_folders_are_versions(tmp_path: Path) -> None:
    model = tmp_path / "m"
    for folder, files in {
        "1": ["model.onnx", "explain.onnx"],
        "2": ["m.fp32.onnx", "m.int8.onnx", "m.explain.onnx"],  # int8 preferred on CPU
        "3": [],  # empty: not a version (yet)
        ".tmp-4": ["model.onnx"],  # a publisher's folder before its rename
        "latest": ["model.onnx"],
        "0": ["model.onnx"],  # versions start at 1, as in Triton
    }.items():
        (model / folder).mkdir(parents=True)
        for f in files:
            (model / folder / f).write_bytes(b"x")
    (tmp_path / ".hidden").mkdir()
    source = RepositorySource(tmp_path, Settings(model_repository=tmp_path))
    assert source.models() == ["m"]
    found = source.versions("m")
    assert sorted(found) == [1, 2]
    assert found[1].artifact.name == "model.onnx" and found[1].explain.name == "explain.onnx"
    assert found[2].artifact.name == "m.int8.onnx" and found[2].explain.name == "m.explain.onnx"
    assert source.versions("../m") == {} and source.versions("nope") == {}


def test_committed_default_repository_serves_the_shipped_model() -> None:
    source = RepositorySource(Settings().model_repository, Settings())
    assert "esc50-resnet34" in source.models()
    (v,) = source.versions("esc50-resnet34").values()
    assert v.version == 1 and v.artifact.resolve() == SHIPPED.resolve()


# --- a running service -------------------------------------------------------------------------


def settings(repo: Path, **kw) -> Settings:
    return Settings(
        model_repository=repo,
        admin_token=ADMIN,
        intra_op_threads=1,
        max_wait_ms=2,
        **kw,
    )


def control(base: str, verb: str, name: str, body: dict | None = None, headers=None):
    return httpx.post(
        f"{base}/v2/repository/models/{name}/{verb}",
        json=body or {},
        headers=ADMIN_HEADERS if headers is None else headers,
        timeout=120,
    )


def wait_unloaded(base: str, timeout: float = 60) -> dict:
    until = time.monotonic() + timeout
    while time.monotonic() < until:
        listing = httpx.get(f"{base}/v1/models").json()
        if not [v for v in listing["unavailable"] if v["state"] == "unloading"]:
            return listing
        time.sleep(0.1)
    pytest.fail(f"still unloading: {listing}")


class Traffic:
    """Clients sending classify requests back to back while the test changes the repository;
    each keeps (status, model) per request in the order it sent them."""

    def __init__(self, base: str, paths: list[str], per_path: int = 2) -> None:
        self.base, self.stop = base, threading.Event()
        self.results: dict[int, list[tuple[int, dict]]] = {}
        self.threads = [
            threading.Thread(target=self._client, args=(i, path))
            for i, path in enumerate(paths * per_path)
        ]

    def _client(self, i: int, path: str) -> None:
        out = self.results.setdefault(i, [])
        body = wav(5.0, seed=i)
        with httpx.Client(base_url=self.base, timeout=60) as c:
            while not self.stop.is_set():
                r = c.post(path, content=body, headers={"content-type": "audio/wav"})
                out.append((r.status_code, r.json().get("model", r.json())))

    def until_every_client_sees(self, version: str, timeout: float = 60) -> None:
        """Keep the traffic going until each client has had an answer from `version` (a slow
        machine may take longer than a fixed pause), or the timeout."""
        until = time.monotonic() + timeout
        while time.monotonic() < until:
            last = [rs[-1][1].get("version") if rs else None for rs in self.results.values()]
            if len(last) == len(self.threads) and all(v == version for v in last):
                return
            time.sleep(0.1)

    def __enter__(self) -> Traffic:
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(60)


def test_swap_rollback_and_failed_load_under_load(tmp_path: Path, tiny_onnx, tiny_int8) -> None:
    """tritonclient's load_model of a new version folder while clients stream requests through
    /v1/classify and the per-model route: no request fails, each client's answers switch from
    the old version to the new at one point, the old version unloads after it drains. Rolling
    back is a load with a specific version policy; a corrupt version fails to load with its
    reason and the serving version keeps answering."""
    import tritonclient.http as triton_http
    from tritonclient.utils import InferenceServerException

    repo = tmp_path / "repo"
    publish(repo, "tiny", 1, tiny_onnx)
    with serve(settings(repo)) as base:
        client = triton_http.InferenceServerClient(base.removeprefix("http://"))
        first = httpx.get(f"{base}/v1/models").json()
        assert [(m["name"], m["version"], m["default"]) for m in first["models"]] == [
            ("tiny", "1", True)
        ]
        paths = ["/v1/classify", "/v1/models/tiny/classify"]
        with Traffic(base, paths) as traffic:
            time.sleep(1.0)
            publish(repo, "tiny", 2, tiny_int8)
            client.load_model("tiny", headers=ADMIN_HEADERS)
            traffic.until_every_client_sees("2")
        statuses = [s for rs in traffic.results.values() for s, _ in rs]
        failed = [body for rs in traffic.results.values() for s, body in rs if s != 200]
        assert statuses and set(statuses) == {200}, f"failed requests: {failed}"
        for i, rs in traffic.results.items():
            versions = [m["version"] for _, m in rs]
            switch = versions.index("2")  # raises if this client never saw the new version
            assert switch > 0 and set(versions[:switch]) == {"1"}, (i, versions)
            assert set(versions[switch:]) == {"2"}, f"client {i} went back: {versions}"
            assert {m["variant"] for _, m in rs[switch:]} == {"int8"}
        listing = wait_unloaded(base)
        assert [(m["version"], m["variant"]) for m in listing["models"]] == [("2", "int8")]
        index = client.get_model_repository_index(headers=ADMIN_HEADERS)
        assert [(m["name"], m["version"], m["state"]) for m in index] == [("tiny", "2", "READY")]

        # rollback: Triton's load with a config whose version_policy names version 1
        rollback = json.dumps({"version_policy": {"specific": {"versions": [1]}}})
        client.load_model("tiny", config=rollback, headers=ADMIN_HEADERS)
        r = httpx.post(f"{base}/v1/classify", content=wav(), headers={"content-type": "audio/wav"})
        assert r.status_code == 200 and r.json()["model"]["version"] == "1"

        # a corrupt newest version: the load fails with its reason, version 1 keeps serving
        publish(repo, "tiny", 3, os.urandom(50_000))
        with pytest.raises(InferenceServerException, match="version 3"):
            client.load_model("tiny", headers=ADMIN_HEADERS)
        r = httpx.post(f"{base}/v1/classify", content=wav(), headers={"content-type": "audio/wav"})
        assert r.status_code == 200 and r.json()["model"]["version"] == "1"
        failed = httpx.get(f"{base}/v1/models").json()["unavailable"]
        assert [(v["version"], v["state"]) for v in failed] == [("3", "failed")]
        assert "model.onnx" in failed[0]["reason"]

        metrics = scrape_metrics(base)
        served = {
            v: metrics.get(
                f'esc50_inference_requests_total{{model="tiny",status="200",version="{v}"}}', 0
            )
            for v in ("1", "2")
        }
        assert served["1"] > 0 and served["2"] > 0, served
        assert metrics['esc50_model_version_loaded{model="tiny",state="ready",version="1"}'] == 1
        assert 'esc50_queue_depth{model="tiny",version="2"}' not in metrics  # unloaded: gone


def test_control_needs_the_admin_token_and_is_off_without_one(tmp_path: Path, tiny_onnx) -> None:
    repo = tmp_path / "repo"
    publish(repo, "tiny", 1, tiny_onnx)
    with serve(settings(repo, api_token="inference-token")) as base:
        assert control(base, "load", "tiny", headers={}).status_code == 401
        inference = {"authorization": "Bearer inference-token"}
        r = control(base, "load", "tiny", headers=inference)
        assert r.status_code == 401 and set(r.json()) == {"error"}  # v2's error shape
        assert control(base, "load", "tiny").status_code == 200
        r = control(base, "load", "nope")
        assert r.status_code == 404 and "nope" in r.json()["error"]
    with serve(settings(repo).model_copy(update={"admin_token": None})) as base:
        r = control(base, "unload", "tiny")
        assert r.status_code == 403 and "ESC50_ADMIN_TOKEN" in r.json()["error"]
        r = httpx.post(f"{base}/v1/classify", content=wav(), headers={"content-type": "audio/wav"})
        assert r.status_code == 200  # still serving


def test_several_models_and_versions_each_answer_on_their_routes(
    tmp_path: Path, tiny_onnx, tiny_int8
) -> None:
    repo = tmp_path / "repo"
    publish(repo, "tiny", 1, tiny_onnx)
    publish(repo, "tiny", 2, tiny_int8)
    publish(repo, "other", 1, tiny_int8)
    (repo / "tiny" / "policy.json").write_text(
        json.dumps({"version_policy": "all", "default_version": "1"})
    )
    wav_headers = {"content-type": "audio/wav"}
    with serve(settings(repo, default_model="other")) as base:
        listing = httpx.get(f"{base}/v1/models").json()
        assert listing["default_model"] == "other"
        assert [(m["name"], m["version"], m["default"]) for m in listing["models"]] == [
            ("other", "1", True),
            ("tiny", "1", True),
            ("tiny", "2", False),
        ]

        def answer(path: str) -> dict:
            r = httpx.post(f"{base}{path}", content=wav(), headers=wav_headers, timeout=60)
            assert r.status_code == 200, r.text
            return r.json()["model"]

        assert answer("/v1/classify")["name"] == "other"
        assert answer("/v1/models/tiny/classify")["version"] == "1"  # policy.json's default
        two = answer("/v1/models/tiny/versions/2/classify")
        assert (two["version"], two["variant"]) == ("2", "int8")
        # the same bytes in two folders: two versions, one content hash
        assert answer("/v1/models/other/classify")["sha256"] == two["sha256"]
        r = httpx.post(f"{base}/v1/models/tiny/versions/9/classify", content=wav())
        assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"
        r = httpx.post(f"{base}/v1/models/nope/classify", content=wav())
        assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"
        # unloading the default model takes the replica out of rotation, with a reason
        assert control(base, "unload", "other").status_code == 200
        r = httpx.post(f"{base}/v1/classify", content=wav(), headers=wav_headers)
        assert r.status_code == 503 and httpx.get(f"{base}/readyz").status_code == 503
        assert answer("/v1/models/tiny/classify")["name"] == "tiny"  # the others still answer


def test_new_versions_and_models_are_picked_up_by_polling(tmp_path: Path, tiny_onnx, tiny_int8):
    """What replicas behind a load balancer rely on (compose, Kubernetes): a published version
    folder or a new model is served by every replica within the poll period, no restart."""
    repo = tmp_path / "repo"
    publish(repo, "tiny", 1, tiny_onnx)
    with serve(settings(repo, repository_poll_s=0.2)) as base:
        publish(repo, "tiny", 2, tiny_int8)
        publish(repo, "mine", 1, tiny_int8)
        until, served = time.monotonic() + 60, []
        while time.monotonic() < until:
            listing = httpx.get(f"{base}/v1/models").json()
            served = [(m["name"], m["version"]) for m in listing["models"]]
            if served == [("mine", "1"), ("tiny", "2")] and not listing["unavailable"]:
                break
            time.sleep(0.2)
        assert served == [("mine", "1"), ("tiny", "2")], listing
        r = httpx.post(f"{base}/v1/models/mine/classify", content=wav())
        assert r.status_code == 200 and r.json()["model"]["name"] == "mine"
        # a model the control API unloaded stays unloaded
        assert control(base, "unload", "mine").status_code == 200
        time.sleep(1.0)
        names = [m["name"] for m in httpx.get(f"{base}/v1/models").json()["models"]]
        assert names == ["tiny"]


def test_unloaded_version_gives_its_memory_back(tmp_path: Path) -> None:
    """The shipped ResNet-34 loaded twice (two folders, same bytes), then one unloaded: the
    process's resident memory falls by most of what that version added when it loaded."""
    repo = tmp_path / "repo"
    for v in (1, 2):
        (repo / "esc50" / str(v)).mkdir(parents=True)
        (repo / "esc50" / str(v) / "model.onnx").symlink_to(SHIPPED)
    with serve(settings(repo, version_policy="all", max_batch_size=8)) as base:
        listing = httpx.get(f"{base}/v1/models").json()
        added = {m["version"]: m["memory_bytes"] for m in listing["models"]}
        assert set(added) == {"1", "2"} and all(b > 20e6 for b in added.values()), added
        before = resident_bytes()  # the server runs in this process (tests/servers.py)
        keep_one = {"parameters": {"config": json.dumps({"version_policy": "specific:1"})}}
        assert control(base, "load", "esc50", keep_one).status_code == 200
        wait_unloaded(base)
        returned = before - resident_bytes()
        assert returned > 0.5 * added["2"], f"returned {returned / 1e6:.0f} MB of {added}"


def test_a_live_stream_moves_to_the_new_version_at_a_window(tmp_path: Path, tiny_onnx, tiny_int8):
    """A stream on the default model resolves its version for every window: a swap moves it to
    the new version between two windows, none skipped, and the old version still unloads."""
    from websockets.sync.client import connect

    repo = tmp_path / "repo"
    publish(repo, "tiny", 1, tiny_onnx)
    second = np.random.default_rng(0).standard_normal(44100).astype("<f4") * 0.1  # 1 s
    config = {"sample_rate": 44100, "channels": 1, "encoding": "pcm_f32le", "hop_s": 1.0}
    with serve(settings(repo)) as base:
        events = []
        with connect(base.replace("http", "ws", 1) + "/v1/stream") as ws:
            ws.send(json.dumps(config))
            assert json.loads(ws.recv(timeout=30))["type"] == "start"
            for _ in range(6):  # the first window at 5 s, then one per second
                ws.send(second.tobytes())
            events.append(json.loads(ws.recv(timeout=30)))
            publish(repo, "tiny", 2, tiny_int8)
            assert control(base, "load", "tiny").status_code == 200
            for _ in range(3):
                ws.send(second.tobytes())
            ws.send(json.dumps({"type": "end"}))
            events += [json.loads(m) for m in ws]
        windows = [e for e in events if e["type"] == "window"]
        versions = [e["model"]["version"] for e in windows]
        assert versions[0] == "1" and versions[-1] == "2", versions
        assert versions == sorted(versions) and sum(e["skipped"] for e in windows) == 0
        assert [m["version"] for m in wait_unloaded(base)["models"]] == ["2"]
