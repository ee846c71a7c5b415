"""Triton model repository (`python -m export triton`, export/triton.py): every config.pbtxt
parses with Triton's own protobuf schema (tritonclient's model_config_pb2) and agrees with the
ONNX graph it serves: names, dims, data types, batch limits, labels."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest

from contract.metadata import read_onnx_metadata, write_sidecar
from export.__main__ import main as export_main
from export.triton import TritonConfig, graph_io, write_repository

pb2 = pytest.importorskip(
    "tritonclient.grpc.model_config_pb2", reason="pip install 'tritonclient[grpc]'"
)
from google.protobuf import text_format  # noqa: E402  (protobuf comes with tritonclient)

REPO = Path(__file__).resolve().parent.parent
SHIPPED = REPO / "models" / "esc50-resnet34"
ONNX_TYPES = {1: "TYPE_FP32", 10: "TYPE_FP16"}


def parse(model_dir: Path):
    return text_format.Parse((model_dir / "config.pbtxt").read_text(), pb2.ModelConfig())


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def graph(onnx_path: Path) -> tuple[list, list]:
    """(name, Triton type, dims without batch) for the graph's inputs and outputs, read with onnx
    directly (not through export.triton)."""
    import onnx

    g = onnx.load(str(onnx_path), load_external_data=False).graph

    def rows(values):
        out = []
        for v in values:
            t = v.type.tensor_type
            dims = [d.dim_value if d.HasField("dim_value") else -1 for d in t.shape.dim]
            assert dims[0] == -1, f"{v.name}: the batch dimension must be dynamic"
            out.append((v.name, ONNX_TYPES[t.elem_type], dims[1:]))
        return out

    return rows(g.input), rows(g.output)


def check_against_graph(model_dir: Path, onnx_path: Path, cfg: TritonConfig) -> None:
    config = parse(model_dir)
    assert config.name == model_dir.name
    inputs, outputs = graph(onnx_path)
    dtype = pb2.DataType.Name
    assert [(i.name, dtype(i.data_type), list(i.dims)) for i in config.input] == inputs
    assert [(o.name, dtype(o.data_type), list(o.dims)) for o in config.output] == outputs
    assert 1 <= config.max_batch_size <= cfg.max_batch_size
    batching = config.dynamic_batching
    assert list(batching.preferred_batch_size) == [
        b for b in cfg.preferred_batch_sizes if b <= config.max_batch_size
    ]
    assert batching.max_queue_delay_microseconds == cfg.max_queue_delay_us
    assert len(config.instance_group) == 1 and config.instance_group[0].count >= 1
    warm_batches = sorted(w.batch_size for w in config.model_warmup)
    assert warm_batches == sorted({1, config.max_batch_size})
    for w in config.model_warmup:
        assert set(w.inputs) == {i.name for i in config.input}
    labels = (model_dir / config.output[0].label_filename).read_text().splitlines()
    meta = read_onnx_metadata(onnx_path)
    assert labels == meta.labels and len(labels) == config.output[0].dims[-1]


# --- the shipped model -----------------------------------------------------------------------


@pytest.mark.skipif(not Path(f"{SHIPPED}.int8.onnx").is_file(), reason="no shipped int8 model")
def test_shipped_int8_model_repository(tmp_path):
    cfg = TritonConfig()
    written = write_repository(SHIPPED, tmp_path, cfg)
    by_name = {d.name: d for d in written}
    model_dir = by_name["esc50-resnet34-int8"]
    check_against_graph(model_dir, Path(f"{SHIPPED}.int8.onnx"), cfg)
    config = parse(model_dir)
    assert config.platform == "onnxruntime_onnx"
    assert config.instance_group[0].kind == pb2.ModelInstanceGroup.KIND_CPU
    assert config.parameters["intra_op_thread_count"].string_value == "0"
    assert sha(model_dir / "1" / "model.onnx") == sha(Path(f"{SHIPPED}.int8.onnx"))


def test_make_target_writes_the_repository(tmp_path):
    if not Path(f"{SHIPPED}.int8.onnx").is_file():
        pytest.skip("no shipped int8 model")
    out = tmp_path / "triton"
    argv = [
        "triton",
        "--artifacts",
        str(SHIPPED),
        "--out",
        str(out),
        "--max-batch-size",
        "32",
        "--preferred-batch-sizes",
        "16,32",
    ]
    assert export_main(argv) == 0
    config = parse(out / "esc50-resnet34-int8")
    assert config.max_batch_size == 32 and list(config.dynamic_batching.preferred_batch_size) == [
        16,
        32,
    ]


# --- every kind of artifact, on the tiny model -----------------------------------------------


def write_verify(prefix: Path, **passed: bool) -> None:
    verify = {"variants": {v: {"passed": ok} for v, ok in passed.items()}}
    Path(f"{prefix}.verify.json").write_text(json.dumps(verify))


@pytest.fixture()
def artifacts(tmp_path, tiny_onnx, tiny_fp16, tiny_int8) -> Path:
    """tiny.{fp32,fp16,int8}.onnx as the exporter and the quantiser wrote them, a verify.json
    passing fp16 only, and a stand-in TensorRT plan with its sidecar."""
    prefix = tmp_path / "tiny"
    for variant, graph_file in (("fp32", tiny_onnx), ("fp16", tiny_fp16), ("int8", tiny_int8)):
        shutil.copyfile(graph_file, f"{prefix}.{variant}.onnx")
    write_verify(prefix, fp16=True, int8=False)
    plan = Path(f"{prefix}.fp16.plan")
    plan.write_bytes(b"not a real engine: Triton would load it, these tests only read configs")
    profile = {"input": "waveform", "min": [1, 1], "opt": [4, 1], "max": [8, 1]}
    write_sidecar(
        plan, read_onnx_metadata(tiny_fp16), {"profile": profile, "onnx_file": "tiny.fp16.onnx"}
    )
    return prefix


def check_serves_its_variant(model_dir: Path, prefix: Path, variant: str) -> None:
    """The model's 1/model.onnx is the `variant` artifact itself (each variant is a different
    graph, so serving the wrong one shows)."""
    served = model_dir / "1" / "model.onnx"
    assert sha(served) == sha(Path(f"{prefix}.{variant}.onnx")), f"{model_dir.name} serves another"
    assert read_onnx_metadata(served).variant == variant


def test_the_variants_are_different_graphs(artifacts):
    shas = {sha(Path(f"{artifacts}.{v}.onnx")) for v in ("fp32", "fp16", "int8")}
    assert len(shas) == 3


def test_every_servable_artifact_becomes_a_model(artifacts, tmp_path):
    cfg = TritonConfig(cpu_instances=2)
    written = {d.name: d for d in write_repository(artifacts, tmp_path / "repo", cfg)}
    assert set(written) == {"tiny-fp32", "tiny-fp16", "tiny-tensorrt"}, "int8 did not pass verify"
    kinds = {n: parse(d).instance_group[0] for n, d in written.items()}
    assert kinds["tiny-fp32"].kind == pb2.ModelInstanceGroup.KIND_CPU
    assert kinds["tiny-fp32"].count == 2
    assert kinds["tiny-fp16"].kind == pb2.ModelInstanceGroup.KIND_GPU
    for variant in ("fp32", "fp16"):
        model_dir = written[f"tiny-{variant}"]
        check_against_graph(model_dir, Path(f"{artifacts}.{variant}.onnx"), cfg)
        check_serves_its_variant(model_dir, artifacts, variant)


def test_int8_that_passed_verify_is_a_cpu_model(artifacts, tmp_path):
    write_verify(artifacts, fp16=False, int8=True)
    cfg = TritonConfig()
    written = {d.name: d for d in write_repository(artifacts, tmp_path / "repo", cfg)}
    assert {"tiny-int8", "tiny-fp32"} <= set(written) and "tiny-fp16" not in written
    assert parse(written["tiny-int8"]).instance_group[0].kind == pb2.ModelInstanceGroup.KIND_CPU
    check_against_graph(written["tiny-int8"], Path(f"{artifacts}.int8.onnx"), cfg)
    check_serves_its_variant(written["tiny-int8"], artifacts, "int8")


def test_tensorrt_model_is_bounded_by_the_engine_profile(artifacts, tmp_path):
    written = {d.name: d for d in write_repository(artifacts, tmp_path / "repo", TritonConfig())}
    model_dir = written["tiny-tensorrt"]
    config = parse(model_dir)
    assert config.platform == "tensorrt_plan"
    assert config.max_batch_size == 8, "the profile's max batch, below the default 16"
    assert (model_dir / "1" / "model.plan").read_bytes() == Path(
        f"{artifacts}.fp16.plan"
    ).read_bytes()
    check_against_graph(model_dir, Path(f"{artifacts}.fp16.onnx"), TritonConfig(max_batch_size=8))


def test_io_is_read_from_the_graph(tiny_onnx):
    inputs, outputs = graph_io(tiny_onnx)
    assert [(t.name, t.data_type) for t in inputs] == [("waveform", "TYPE_FP32")]
    meta = read_onnx_metadata(tiny_onnx)
    assert inputs[0].dims == (meta.clip_samples,)
    assert outputs[0].name == "logits" and outputs[0].dims == (len(meta.labels),)


def test_bad_batching_and_missing_artifacts_are_one_line_errors(tmp_path):
    from contract.errors import ExportError

    with pytest.raises(ExportError, match="preferred"):
        write_repository(tmp_path / "x", tmp_path, TritonConfig(preferred_batch_sizes=(32,)))
    with pytest.raises(ExportError, match="no servable artifact"):
        write_repository(tmp_path / "missing", tmp_path, TritonConfig())


def test_the_triton_repository_is_a_model_repository_this_service_serves(tmp_path):
    """Issue 16: `make export-triton`'s folder and the service's model repository are one
    layout: pointed at it, the service lists every model the export wrote (Triton reads its
    config.pbtxt, the service the ONNX metadata beside it)."""
    from service.repository import RepositorySource
    from service.settings import Settings

    written = write_repository(SHIPPED, tmp_path, TritonConfig())
    source = RepositorySource(tmp_path, Settings(model_repository=tmp_path))
    assert source.models() == sorted(d.name for d in written)
    (version,) = source.versions("esc50-resnet34-int8").values()
    assert (
        version.version == 1 and version.artifact == tmp_path / "esc50-resnet34-int8/1/model.onnx"
    )
