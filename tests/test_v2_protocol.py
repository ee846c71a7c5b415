"""The Open Inference Protocol (v2) through clients nobody here wrote: tritonclient's HTTP and
gRPC clients against a real uvicorn server (tests/servers.py) with the gRPC port beside it.
Answers must equal /v1/classify's for the same bytes; bad tensors get the protocol's error
(400 `{"error": "..."}` / INVALID_ARGUMENT) and the server keeps serving; the Triton backend
sends its batches to a second server's v2 gRPC endpoint and answers what that server answers.
(KServe's Python client is not tested: `pip install kserve` would downgrade psutil and
python-dateutil in the shared environment and pull pandas and kubernetes.)"""

from __future__ import annotations

import io
import json
import struct
import threading
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
import soundfile as sf
from conftest import waveforms
from servers import free_port, scrape_metrics, serve

from service.backends import load_backend
from service.settings import Settings

th = pytest.importorskip("tritonclient.http", reason="pip install 'tritonclient[http]'")
tg = pytest.importorskip("tritonclient.grpc", reason="pip install 'tritonclient[grpc]'")
import grpc  # noqa: E402  (comes with tritonclient[grpc])
from tritonclient.utils import InferenceServerException  # noqa: E402

SR = 44100
TOKEN, ADMIN = "s3cret", "adm1n"
TINY = 'model="tiny",version="1"'


def encode(x: np.ndarray, subtype: str = "PCM_16", fmt: str = "WAV") -> bytes:
    buf = io.BytesIO()
    sf.write(buf, x, SR, format=fmt, subtype=subtype)
    return buf.getvalue()


def tone(seconds: float, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * SR)) / SR
    x = 0.2 * np.sin(2 * np.pi * (200 + 150 * seed) * t) + 0.05 * rng.standard_normal(len(t))
    return x.astype(np.float32)


CLIP = encode(tone(5.0, 1))
LONG = encode(tone(12.0, 2), fmt="FLAC", subtype="PCM_16")  # 4 windows


def v1(base: str, body: bytes, headers: dict | None = None) -> dict:
    r = httpx.post(
        f"{base}/v1/classify",
        params={"top_k": 50},
        content=body,
        headers={"content-type": "application/octet-stream", **(headers or {})},
        timeout=60,
    )
    assert r.status_code == 200, r.text
    return r.json()


def v1_vector(answer: dict, n_classes: int) -> np.ndarray:
    """/v1's probabilities as v2 sends them: indexed by class, float32."""
    out = np.zeros(n_classes, dtype=np.float32)
    for p in answer["predictions"]:
        out[p["index"]] = p["probability"]
    return out


def bytes_input(module, clips: list[bytes], binary: bool = True):
    x = module.InferInput("audio", [len(clips)], "BYTES")
    arr = np.array(clips, dtype=np.object_)
    if module is th:
        x.set_data_from_numpy(arr, binary_data=binary)
    else:
        x.set_data_from_numpy(arr)
    return x


def wave_input(module, x: np.ndarray):
    t = module.InferInput("waveform", list(x.shape), "FP32")
    t.set_data_from_numpy(x)
    return t


@pytest.fixture(scope="module")
def server(tiny_onnx: Path) -> Iterator[tuple[str, str]]:
    """(HTTP base URL, gRPC host:port) of the tiny fp32 model's server."""
    port = free_port()
    settings = Settings(
        model_path=tiny_onnx, grpc_port=port, intra_op_threads=1, max_batch_size=8, max_wait_ms=5
    )
    with serve(settings) as base:
        yield base, f"127.0.0.1:{port}"


@pytest.fixture(scope="module")
def http(server) -> Iterator:
    client = th.InferenceServerClient(server[0].removeprefix("http://"), network_timeout=60)
    yield client
    client.close()


@pytest.fixture(scope="module")
def grpc_client(server) -> Iterator:
    client = tg.InferenceServerClient(server[1])
    yield client
    client.close()


# --- health and metadata ---------------------------------------------------------------------


def test_health_bodies_and_statuses(server, http, grpc_client) -> None:
    base, _ = server
    assert httpx.get(f"{base}/v2/health/live").json() == {"live": True}
    r = httpx.get(f"{base}/v2/health/ready")
    assert (r.status_code, r.json()) == (200, {"ready": True})
    r = httpx.get(f"{base}/v2/models/tiny/ready")
    assert (r.status_code, r.json()) == (200, {"name": "tiny", "ready": True})
    assert http.is_server_live() and http.is_server_ready() and http.is_model_ready("tiny")
    assert http.is_model_ready("tiny", "1") and not http.is_model_ready("tiny", "7")
    assert grpc_client.is_server_live() and grpc_client.is_server_ready()
    assert grpc_client.is_model_ready("tiny") and grpc_client.is_model_ready("tiny", "1")


def test_server_and_model_metadata(server, http, grpc_client, tiny_onnx) -> None:
    for md in (http.get_server_metadata(), grpc_client.get_server_metadata(as_json=True)):
        assert {"classification", "binary_tensor_data", "model_repository"} <= set(md["extensions"])
        assert md["name"] == "esc50-serve"
    expected_inputs = [
        {"name": "audio", "datatype": "BYTES", "shape": [-1]},
        {"name": "waveform", "datatype": "FP32", "shape": [-1, 220500]},
    ]
    expected_outputs = [
        {"name": "probabilities", "datatype": "FP32", "shape": [-1, 5]},
        {"name": "logits", "datatype": "FP32", "shape": [-1, 5]},
    ]
    md = http.get_model_metadata("tiny")
    assert (md["name"], md["versions"], md["platform"]) == ("tiny", ["1"], "onnxruntime_onnx")
    assert md["inputs"] == expected_inputs and md["outputs"] == expected_outputs
    g = grpc_client.get_model_metadata("tiny", "1", as_json=True)
    assert g["inputs"] == [{**t, "shape": [str(d) for d in t["shape"]]} for t in expected_inputs]
    assert g["versions"] == ["1"] and g["platform"] == "onnxruntime_onnx"
    r = httpx.get(f"{server[0]}/v2/models/nope")
    assert r.status_code == 404 and set(r.json()) == {"error"}
    with pytest.raises(InferenceServerException, match="nope"):
        grpc_client.get_model_metadata("nope")


# --- infer: the answers of /v1/classify ------------------------------------------------------


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_bytes_clips_answer_what_v1_answers(server, http, grpc_client, protocol) -> None:
    """Two encoded files in one tensor (one of them 12 s: 4 windows, averaged as /v1 does):
    the same probabilities as /v1/classify per file, to the float32 they are sent as."""
    base, _ = server
    expected = np.stack([v1_vector(v1(base, b), 5) for b in (CLIP, LONG)])  # (2, 5)
    client, module = (http, th) if protocol == "http" else (grpc_client, tg)
    result = client.infer("tiny", [bytes_input(module, [CLIP, LONG])])
    probs = result.as_numpy("probabilities")
    assert probs.dtype == np.float32 and probs.shape == (2, 5)
    np.testing.assert_array_equal(probs, expected)
    assert list(probs.argmax(axis=1)) == list(expected.argmax(axis=1))
    assert result.as_numpy("logits").shape == (2, 5)


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_fp32_waveforms_equal_the_same_samples_sent_as_a_file(server, http, grpc_client, protocol):
    """FP32 [n, 220500] skips decoding: it answers what a float WAV of the same samples gets
    (no resampling at 44.1 kHz, one window) and its logits are the model's."""
    x = waveforms(3, seed=4)  # (3, 220500)
    client, module = (http, th) if protocol == "http" else (grpc_client, tg)
    wave = client.infer("tiny", [wave_input(module, x)])
    files = client.infer("tiny", [bytes_input(module, [encode(w, "FLOAT") for w in x])])
    np.testing.assert_array_equal(wave.as_numpy("probabilities"), files.as_numpy("probabilities"))
    np.testing.assert_array_equal(wave.as_numpy("logits"), files.as_numpy("logits"))


def test_classification_extension(server, http, grpc_client) -> None:
    x = waveforms(2, seed=5)
    ask = [th.InferRequestedOutput("probabilities", class_count=3)]
    top = http.infer("tiny", [wave_input(th, x)], outputs=ask).as_numpy("probabilities")
    plain = http.infer("tiny", [wave_input(th, x)]).as_numpy("probabilities")  # (2, 5)
    assert top.shape == (2, 3)
    labels = ["dog", "rain", "crying_baby", "door_wood_knock", "helicopter"]
    for row, p in zip(top, plain, strict=True):
        parts = [e.decode().split(":") for e in row]
        assert [int(i) for _, i, _ in parts] == list(np.argsort(-p, kind="stable")[:3])
        assert [lab for _, i, lab in parts] == [labels[int(i)] for _, i, _ in parts]
        np.testing.assert_allclose([float(v) for v, _, _ in parts], np.sort(p)[::-1][:3], atol=1e-6)
    g = grpc_client.infer(
        "tiny", [wave_input(tg, x)], outputs=[tg.InferRequestedOutput("logits", class_count=2)]
    )
    assert g.as_numpy("logits").shape == (2, 2) and g.as_numpy("probabilities") is None


def test_binary_outputs_both_ways(server, http) -> None:
    """Per output (binary_data) and per request (binary_data_output); the JSON header's
    length in Inference-Header-Content-Length; JSON and binary give the same floats."""
    base, _ = server
    x = waveforms(1, seed=6)
    outs = [
        th.InferRequestedOutput("probabilities", binary_data=True),
        th.InferRequestedOutput("logits", binary_data=False),
    ]
    r = http.infer("tiny", [wave_input(th, x)], outputs=outs)
    by_output = {o["name"]: o for o in r.get_response()["outputs"]}
    assert by_output["probabilities"]["parameters"] == {"binary_data_size": 20}
    assert len(by_output["logits"]["data"]) == 5
    header = json.dumps(
        {
            "inputs": [
                {
                    "name": "waveform",
                    "datatype": "FP32",
                    "shape": [1, 220500],
                    "parameters": {"binary_data_size": x.nbytes},
                }
            ],
            "parameters": {"binary_data_output": True},
        }
    ).encode()
    raw = httpx.post(
        f"{base}/v2/models/tiny/versions/1/infer",
        content=header + x.tobytes(),
        headers={"Inference-Header-Content-Length": str(len(header))},
    )
    assert raw.status_code == 200, raw.text
    n = int(raw.headers["inference-header-content-length"])
    doc = json.loads(raw.content[:n])
    assert [o["parameters"]["binary_data_size"] for o in doc["outputs"]] == [20, 20]
    probs = np.frombuffer(raw.content[n : n + 20], dtype="<f4")
    np.testing.assert_array_equal(probs, r.as_numpy("probabilities")[0])
    as_json = {"name": "waveform", "datatype": "FP32", "shape": [1, 220500]}
    plain = httpx.post(
        f"{base}/v2/models/tiny/infer",
        json={"inputs": [{**as_json, "data": x.ravel().tolist()}]},
    )
    assert "inference-header-content-length" not in plain.headers
    assert np.float32(plain.json()["outputs"][0]["data"]).tolist() == probs.tolist()


def test_json_base64_bytes_like_curl(server) -> None:
    """What docs/v2-protocol.md's curl sends: the file base64-encoded in JSON."""
    import base64

    base, _ = server
    body = {
        "id": "req-1",
        "inputs": [
            {
                "name": "audio",
                "datatype": "BYTES",
                "shape": [1],
                "data": [base64.b64encode(CLIP).decode()],
                "parameters": {"content_type": "base64"},
            }
        ],
        "outputs": [{"name": "probabilities", "parameters": {"classification": 1}}],
    }
    doc = httpx.post(f"{base}/v2/models/tiny/infer", json=body, timeout=30).json()
    assert doc["id"] == "req-1" and doc["model_version"] == "1"
    value, index, label = doc["outputs"][0]["data"][0].split(":")
    top = v1(base, CLIP)["predictions"][0]
    assert (int(index), label) == (top["index"], top["label"])


# --- bad tensors: the protocol's 400, never a 500, and the server keeps serving ---------------


def _bin_request(name: str, datatype: str, shape: list, raw: bytes) -> tuple[bytes, dict]:
    head = json.dumps(
        {
            "inputs": [
                {
                    "name": name,
                    "datatype": datatype,
                    "shape": shape,
                    "parameters": {"binary_data_size": len(raw)},
                }
            ]
        }
    ).encode()
    return head + raw, {"Inference-Header-Content-Length": str(len(head))}


def _elements(*items: bytes) -> bytes:
    return b"".join(struct.pack("<I", len(i)) + i for i in items)


NAN = waveforms(1, seed=7)
NAN[0, 1000] = np.nan
BAD = {
    "audio sent as FP32": _bin_request("audio", "FP32", [1], b"\0" * 4),
    "waveform sent as BYTES": _bin_request("waveform", "BYTES", [1, 220500], _elements(CLIP)),
    "a short waveform": _bin_request("waveform", "FP32", [1, 1000], b"\0" * 4000),
    "sizes disagree": _bin_request("waveform", "FP32", [2, 220500], b"\0" * 4 * 220500),
    "empty BYTES element": _bin_request("audio", "BYTES", [2], _elements(CLIP, b"")),
    "undecodable audio": _bin_request("audio", "BYTES", [1], _elements(b"not audio at all")),
    "a NaN sample": _bin_request("waveform", "FP32", [1, 220500], NAN.tobytes()),
    "a broken length prefix": _bin_request("audio", "BYTES", [1], b"\xff\0\0\0abc"),
    "unknown input": _bin_request("spectrogram", "FP32", [1], b"\0" * 4),
    "no elements": _bin_request("audio", "BYTES", [0], b""),
    "not JSON": (b"{nope", {}),
    "header length past the body": (b"{}", {"Inference-Header-Content-Length": "99"}),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_tensors_get_400_and_the_server_keeps_serving(server, http, case) -> None:
    base, _ = server
    body, headers = BAD[case]
    r = httpx.post(f"{base}/v2/models/tiny/infer", content=body, headers=headers, timeout=30)
    assert r.status_code == 400, r.text
    doc = r.json()
    assert set(doc) == {"error"} and isinstance(doc["error"], str) and doc["error"]
    assert "internal" not in doc["error"]
    assert http.infer("tiny", [bytes_input(th, [CLIP])]).as_numpy("probabilities").shape == (1, 5)


def test_bad_tensors_over_grpc_are_invalid_argument(server, grpc_client) -> None:
    cases = {
        "undecodable": bytes_input(tg, [b"not audio at all"]),
        "empty": bytes_input(tg, [CLIP, b""]),
        "nan": wave_input(tg, NAN),
        "short": wave_input(tg, np.zeros((1, 1000), np.float32)),
    }
    for what, tensor in cases.items():
        with pytest.raises(InferenceServerException) as e:
            grpc_client.infer("tiny", [tensor])
        assert e.value.status() == "StatusCode.INVALID_ARGUMENT", what
    bad_output = [tg.InferRequestedOutput("embeddings")]
    with pytest.raises(InferenceServerException, match="unknown output"):
        grpc_client.infer("tiny", [bytes_input(tg, [CLIP])], outputs=bad_output)
    assert grpc_client.infer("tiny", [bytes_input(tg, [CLIP])]).as_numpy("logits").shape == (1, 5)


def test_v2_requests_count_on_the_model_version(server, http) -> None:
    base, _ = server
    series = 'esc50_inference_requests_total{model="tiny",status="400",version="1"}'
    before = scrape_metrics(base).get(series, 0.0)
    with pytest.raises(InferenceServerException):
        http.infer("tiny", [bytes_input(th, [b"junk"])])
    assert scrape_metrics(base)[series] == before + 1


# --- auth ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def guarded(tiny_onnx: Path) -> Iterator[tuple[str, str]]:
    port = free_port()
    settings = Settings(
        model_path=tiny_onnx, grpc_port=port, api_token=TOKEN, admin_token=ADMIN, intra_op_threads=1
    )
    with serve(settings) as base:
        yield base, f"127.0.0.1:{port}"


def test_inference_token_on_rest_and_grpc(guarded) -> None:
    base, address = guarded
    http = th.InferenceServerClient(base.removeprefix("http://"))
    g = tg.InferenceServerClient(address)
    try:
        assert http.is_server_ready() and g.is_server_ready()  # health needs no token
        with pytest.raises(InferenceServerException) as e:
            http.infer("tiny", [bytes_input(th, [CLIP])])
        assert e.value.status() == "401" and "token" in e.value.message()
        with pytest.raises(InferenceServerException) as e:
            g.infer("tiny", [bytes_input(tg, [CLIP])], headers={"authorization": "Bearer nope"})
        assert e.value.status() == "StatusCode.UNAUTHENTICATED"

        def ok() -> dict[str, str]:  # a new dict each call: tritonclient's HTTP client adds to it
            return {"authorization": f"Bearer {TOKEN}"}

        assert http.infer("tiny", [bytes_input(th, [CLIP])], headers=ok()).as_numpy("logits").size
        assert g.infer("tiny", [bytes_input(tg, [CLIP])], headers=ok()).as_numpy("logits").size
        # the repository RPCs take the admin token, not the inference one
        with pytest.raises(InferenceServerException) as e:
            g.get_model_repository_index(headers=ok())
        assert e.value.status() == "StatusCode.UNAUTHENTICATED"
        index = g.get_model_repository_index(headers={"authorization": f"Bearer {ADMIN}"})
        assert [(m.name, m.version, m.state) for m in index.models] == [("tiny", "1", "READY")]
    finally:
        http.close()
        g.close()


# --- overload: refused before anything is read or decoded -----------------------------------


def test_overload_is_503_with_retry_after_before_decoding(tiny_onnx: Path) -> None:
    """One request's batch blocks in the backend and a second fills the queue (one place):
    a v2 request then gets 503 + Retry-After (gRPC: UNAVAILABLE), and no decode runs for it."""
    gate = threading.Event()

    def held_loader(settings: Settings, path: Path):
        backend = load_backend(settings, path)
        predict = backend.predict

        def held(x: np.ndarray) -> np.ndarray:
            gate.wait(30)  # no warm-up: the first batch is the first request's
            return predict(x)

        backend.predict = held  # type: ignore[method-assign]
        return backend

    port = free_port()
    settings = Settings(
        model_path=tiny_onnx, grpc_port=port, max_queue_size=1, max_batch_size=1, warmup=False
    )
    decode = f"esc50_decode_duration_seconds_count{{{TINY}}}"
    taken = f"esc50_queue_duration_seconds_count{{{TINY}}}"  # jobs the batcher took
    depth = f"esc50_queue_depth{{{TINY}}}"

    def wait_for(want: dict[str, float]) -> None:
        for _ in range(300):
            m = scrape_metrics(base)
            if all(m.get(k, 0) == v for k, v in want.items()):
                return
        pytest.fail(f"never saw {want}")

    with serve(settings, held_loader) as base:
        waiting = []
        try:
            # the first request in the backend (out of the queue), then a second in the queue
            for want in ({taken: 1, depth: 0}, {decode: 2, depth: 1}):
                waiting.append(threading.Thread(target=v1, args=(base, CLIP), daemon=True))
                waiting[-1].start()
                wait_for(want)
            body, headers = _bin_request("audio", "BYTES", [1], _elements(CLIP))
            r = httpx.post(f"{base}/v2/models/tiny/infer", content=body, headers=headers)
            assert r.status_code == 503 and r.headers["retry-after"] == "1", r.text
            assert "queue" in r.json()["error"]
            g = tg.InferenceServerClient(f"127.0.0.1:{port}")
            with pytest.raises(InferenceServerException) as e:
                g.infer("tiny", [bytes_input(tg, [CLIP])])
            g.close()
            assert e.value.status() == "StatusCode.UNAVAILABLE"
            assert scrape_metrics(base)[decode] == 2  # neither refused request was decoded
        finally:
            gate.set()
            for t in waiting:
                t.join(60)


# --- the Triton backend: batches to a remote v2 server ---------------------------------------


@pytest.fixture(scope="module")
def remote(tiny_onnx: Path, tmp_path_factory) -> Iterator[tuple[str, int]]:
    """The remote v2 server: this service on a repository holding the fp32 tiny model,
    model control open (the test unloads it to make the remote fail)."""
    repo = tmp_path_factory.mktemp("remote-repo")
    (repo / "tiny" / "1").mkdir(parents=True)
    (repo / "tiny" / "1" / "model.onnx").symlink_to(tiny_onnx)
    port = free_port()
    settings = Settings(
        model_repository=repo, grpc_port=port, control_open=True, intra_op_threads=1
    )
    with serve(settings) as base:
        yield base, port


def test_triton_backend_answers_what_the_remote_answers(remote, tiny_onnx: Path) -> None:
    remote_base, remote_port = remote
    settings = Settings(
        model_path=tiny_onnx,
        backend="triton",
        triton_url=f"127.0.0.1:{remote_port}",
        triton_model="tiny",
        max_batch_size=4,
    )
    with serve(settings) as base:
        card = httpx.get(f"{base}/v1/models").json()["models"][0]
        assert card["backend"] == "triton" and card["provider"] == f"127.0.0.1:{remote_port}/tiny"
        for body in (CLIP, LONG):  # LONG: 4 windows, one batch of 4 over gRPC
            local, direct = v1(base, body), v1(remote_base, body)
            assert local["predictions"] == direct["predictions"]
        # the remote fails (its model unloaded): exactly that request fails, with a 500
        admin = tg.InferenceServerClient(f"127.0.0.1:{remote_port}")
        admin.unload_model("tiny")
        r = httpx.post(f"{base}/v1/classify", content=CLIP, headers={"content-type": "audio/wav"})
        assert r.status_code == 500 and r.json()["error"]["message"] == "internal error"
        admin.load_model("tiny")
        admin.close()
        assert v1(base, CLIP)["predictions"] == v1(remote_base, CLIP)["predictions"]


def test_triton_backend_refuses_a_remote_without_the_model(remote, tiny_onnx: Path) -> None:
    from service.backends import BackendUnavailable

    settings = Settings(
        backend="triton", triton_url=f"127.0.0.1:{remote[1]}", triton_model="absent"
    )
    with pytest.raises(BackendUnavailable, match="absent"):
        load_backend(settings, tiny_onnx)


# --- the shipped model on real ESC-50 clips --------------------------------------------------


def test_shipped_model_real_clips_through_both_clients(repo_root: Path, esc50_root: Path) -> None:
    model = repo_root / "models" / "esc50-resnet34.int8.onnx"
    if not model.is_file():
        pytest.skip(f"{model} not present")
    clips = [p.read_bytes() for p in sorted((esc50_root / "audio").iterdir())[:3]]
    port = free_port()
    with serve(Settings(model_path=model, grpc_port=port, max_batch_size=4)) as base:
        expected = np.stack([v1_vector(v1(base, c), 50) for c in clips])  # (3, 50)
        http = th.InferenceServerClient(base.removeprefix("http://"), network_timeout=120)
        g = tg.InferenceServerClient(f"127.0.0.1:{port}")
        try:
            for client, module in ((http, th), (g, tg)):
                result = client.infer("esc50-resnet34", [bytes_input(module, clips)])
                np.testing.assert_array_equal(result.as_numpy("probabilities"), expected)
        finally:
            http.close()
            g.close()


def test_grpc_contents_instead_of_raw_inputs(server, grpc_client) -> None:
    """KServe-style clients may send `contents` (typed values) instead of raw bytes: the same
    answers as tritonclient's raw_input_contents."""
    from tritonclient.grpc import service_pb2 as pb
    from tritonclient.grpc import service_pb2_grpc as pb_grpc

    x = waveforms(1, seed=8)
    tensor = pb.ModelInferRequest.InferInputTensor
    inputs = {
        "waveform": tensor(
            name="waveform",
            datatype="FP32",
            shape=[1, 220500],
            contents=pb.InferTensorContents(fp32_contents=x.ravel().tolist()),
        ),
        "audio": tensor(
            name="audio",
            datatype="BYTES",
            shape=[1],
            contents=pb.InferTensorContents(bytes_contents=[CLIP]),
        ),
    }
    raw = {
        "waveform": grpc_client.infer("tiny", [wave_input(tg, x)]),
        "audio": grpc_client.infer("tiny", [bytes_input(tg, [CLIP])]),
    }
    with grpc.insecure_channel(server[1]) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        for name, t in inputs.items():
            reply = stub.ModelInfer(pb.ModelInferRequest(model_name="tiny", inputs=[t]))
            assert [o.name for o in reply.outputs] == ["probabilities", "logits"]
            probs = np.frombuffer(reply.raw_output_contents[0], dtype="<f4")
            np.testing.assert_array_equal(probs, raw[name].as_numpy("probabilities")[0])


def test_grpc_calls_carry_a_request_id_like_the_http_routes(server, caplog) -> None:
    """Issue 20 for gRPC: the caller's well-formed `x-request-id` comes back in the initial
    metadata (a malformed one is replaced), errors carry it in their trailers, and the
    service's access line names it with the model version that answered."""
    from tritonclient.grpc import service_pb2 as pb
    from tritonclient.grpc import service_pb2_grpc as pb_grpc

    tensor = pb.ModelInferRequest.InferInputTensor(
        name="audio",
        datatype="BYTES",
        shape=[1],
        contents=pb.InferTensorContents(bytes_contents=[CLIP]),
    )
    request = pb.ModelInferRequest(model_name="tiny", inputs=[tensor])
    caplog.set_level("INFO", logger="service.access")
    with grpc.insecure_channel(server[1]) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        _, call = stub.ModelInfer.with_call(request, metadata=[("x-request-id", "grpc-trace-42")])
        assert ("x-request-id", "grpc-trace-42") in call.initial_metadata()
        _, call = stub.ModelInfer.with_call(request, metadata=[("x-request-id", "bad id!")])
        (given,) = [v for k, v in call.initial_metadata() if k == "x-request-id"]
        assert given != "bad id!" and len(given) == 32
        with pytest.raises(grpc.RpcError) as failed:
            stub.ModelInfer(
                pb.ModelInferRequest(model_name="nope", inputs=[tensor]),
                metadata=[("x-request-id", "grpc-missing-7")],
            )
    assert failed.value.code() == grpc.StatusCode.NOT_FOUND
    assert ("x-request-id", "grpc-missing-7") in failed.value.trailing_metadata()
    lines = {r.request_id: r for r in caplog.records if hasattr(r, "request_id")}
    ok, missing = lines["grpc-trace-42"], lines["grpc-missing-7"]
    assert (ok.status, ok.model, ok.model_version) == (200, "tiny", "1")
    assert (missing.status, missing.error_code) == (404, "model_not_found")
