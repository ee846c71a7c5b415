"""loadtests.bench's report: targets checked from the figures, markdown with machine and command."""

from __future__ import annotations

import argparse
import os

from loadtests.bench import check_targets, cpu_count, markdown, pinning


def load_row(c: int, rps: float, p99: float, failed: dict | None = None) -> dict:
    return {
        "concurrency": c,
        "rps": rps,
        "p50_ms": p99 / 2,
        "p95_ms": p99,
        "p99_ms": p99,
        "failed": failed or {},
        "ok": int(rps * 8),
        "client_cpu_s": 2.0,
        "client_wall_s": 8.0,
    }


def report() -> dict:
    raw = {"model": "m.fp32.onnx", "batch": 16, "batches": 10, "p50_ms": 300.0, "p99_ms": 320.0}
    sat = load_row(16, 100.0, 400.0)
    overloaded = load_row(160, 95.0, 900.0, {"503": 400})
    overloaded["server"] = {"mean_batch": 15.2, "queue_wait_p99_le_s": 0.5, "server_cores": 1.9}
    return {
        "date": "2026-11-26 03:00 UTC",
        "command": "python -m loadtests.bench --quick",
        "machine": {
            "cpu": "Some CPU",
            "cpus": 2,
            "vnni": ["avx512_vnni"],
            "onnxruntime": "1.32.0",
            "python": "3.11",
        },
        "pinning": "load generator pinned to CPU 1",
        "note": "shared machine",
        "raw": {
            "fp32": {**raw, "clips_per_s": 50.0},
            "int8": {**raw, "model": "m.int8.onnx", "clips_per_s": 140.0},
        },
        "int8_profile": [("QLinearConv", 4.5), ("MatMul", 0.5), ("Sqrt", 0.0001)],
        "service_wav": [load_row(4, 60.0, 90.0), sat],
        "service_as_sent": load_row(16, 90.0, 420.0),
        "baseline": [load_row(1, 12.0, 100.0), load_row(4, 20.0, 300.0)],
        "overload": {"saturation": sat, "run": overloaded},
    }


def test_targets_are_checked_from_the_figures() -> None:
    got = {t["target"]: (round(t["value"], 2), t["met"]) for t in check_targets(report())}
    assert got == {
        "int8_vs_fp32": (2.8, True),
        "service_vs_raw_int8": (0.71, False),
        "service_vs_baseline": (5.0, True),
        "overload_goodput": (0.95, True),
        "overload_p99": (2.25, False),  # at most 2x the p99 at saturation
    }


def test_markdown_names_machine_command_and_every_section() -> None:
    r = report()
    r["targets"] = check_targets(r)
    text = markdown(r)
    for needle in (
        "Some CPU, 2 CPUs",
        "avx512_vnni",
        "`python -m loadtests.bench --quick`",
        "2026-11-26 03:00 UTC",
        "note: shared machine",
        "pinned to CPU 1",
        "| QLinearConv | 4.500 |",
        "Seed-style baseline",
        "160 clients (10x",
        "| 160 | 95.0 |",
        "| 0.25 | 15.2 | <= 0.5 s | 1.90 |",
        "503: 400",
        "| overload_p99 | 2.25 | <= 2 | no |",
    ):
        assert needle in text, needle
    assert "Sqrt" not in text  # operators under 5 us per clip are left out


def test_pinning_keeps_the_load_generator_off_the_server_cores() -> None:
    args = argparse.Namespace(client_cpus="auto", server_cpus="auto")
    client, servers, text = pinning(args)
    assert client is None or "pinned" in text
    none = argparse.Namespace(client_cpus="none", server_cpus="auto")
    assert pinning(none)[:2] == (None, None)
    if (os.cpu_count() or 1) > 1:
        split = pinning(argparse.Namespace(client_cpus="1", server_cpus="0"))
        assert split[:2] == ("1", "0") and "steals no server core" in split[2]
    assert cpu_count("0-2,5") == 4


def test_overload_limited_by_the_load_generator_is_said() -> None:
    r = report()
    r["overload"]["run"].update(client_cpu_s=7.0, client_wall_s=8.0)  # 0.9 of a core
    assert "not the service, limits the request rate" in markdown(r)
    assert "limits the request rate" not in markdown(report())  # 0.25 of a core: no note


def test_without_the_seed_server_the_baseline_is_skipped_with_its_reason(
    monkeypatch, tmp_path
) -> None:
    """A clone without ../shared/bench still benchmarks: the report says the baseline is absent."""
    from loadtests import bench

    missing = tmp_path / "shared" / "bench" / "seed_server.py"
    monkeypatch.setattr(bench, "SEED_SERVER", missing)
    for variant in ("fp32", "int8"):  # only their presence is checked when raw is skipped
        (tmp_path / f"m.{variant}.onnx").touch()
    argv = ["--models", str(tmp_path / "m"), "--skip", "raw,service,overload"]
    args = bench.parse_args([*argv, "--clips", str(bench.BUNDLED_CLIPS)])
    args.argv = argv
    r = bench.run(args)
    assert "baseline" not in r and str(missing) in r["baseline_skipped"]
    assert not [t for t in r["targets"] if t["target"] == "service_vs_baseline"]
    assert f"Seed-style baseline: skipped, no {missing}" in bench.markdown(r)
    assert bench.parse_args([]).out == bench.REPO / "build" / "bench"  # never the committed one
