"""`python -m loadtests.bench` (= `make bench`): every throughput figure of the project in one run,
written to build/bench.{md,json} (`--out`; `make bench RELEASE=1`: the committed
loadtests/reports/bench.{md,json}) with the machine, command and date beside them.

  1. raw ONNX Runtime, fp32 and int8, on pre-decoded real clips at the service's batch size,
     the two models alternating round by round (a shared machine's noise hits both alike), and
     the int8 graph's ORT profile by operator;
  2. the service (`python -m service`, int8) under closed-loop load from loadtests/load.py (a copy
     of ../shared/bench/load.py),
     at rising concurrency with 16-bit WAV uploads (its saturation curve), then at the
     saturating concurrency with the clips as they are on disk (FLAC / Ogg: decode included);
  3. the seed-style baseline server (../shared/bench/seed_server.py, run as it is) with the same
     load generator and its own base64-JSON body, at rising concurrency; skipped, with the reason
     printed and in the report, where ../shared/bench is absent (a clone of this repository alone);
  4. overload: the service at 10x its saturating concurrency: goodput, accepted latency, 503s.

The load generator runs pinned (`taskset`) to the last CPU; on machines with more than two CPUs
the servers are pinned to the others, so it steals no server core. The report says which.
Targets (issue 11) are checked in the report; the exit code is 0 either way.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import platform
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnxruntime as ort
import soundfile as sf

from contract.machine import cpu_flags, cpu_model
from loadtests.local import NotReady, clean_env, exited, free_port, scrape_metrics, wait_ready

REPO = Path(__file__).resolve().parent.parent
SEED_SERVER = REPO.parent / "shared" / "bench" / "seed_server.py"  # the baseline, run as it is
LOAD_PY = Path(__file__).resolve().parent / "load.py"
DEFAULT_CLIPS = REPO.parent / "shared" / "esc50" / "audio"
BUNDLED_CLIPS = Path(__file__).resolve().parent / "clips"  # generated: make_clips.py
DEFAULT_OUT = REPO / "build" / "bench"  # git-ignored; the committed report: make bench RELEASE=1
AUDIO_SUFFIXES = {".wav", ".flac", ".ogg"}
TARGETS = {  # issue 11, same machine, same run
    "int8_vs_fp32": 2.5,  # raw int8 clips/s over raw fp32
    "service_vs_raw_int8": 0.85,  # service req/s (WAV, saturated) over raw int8 clips/s
    "service_vs_baseline": 4.0,  # service best over the baseline at its best concurrency
    "overload_goodput": 0.9,  # goodput at 10x saturating concurrency over the peak
    "overload_p99": 2.0,  # accepted p99 under overload over p99 at saturation (at most)
}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m loadtests.bench", description=__doc__)
    p.add_argument("--models", default="models/esc50-resnet34", help="artifact prefix")
    p.add_argument("--clips", type=Path, default=DEFAULT_CLIPS, help="real clips to send")
    p.add_argument("--max-clips", type=int, default=64, help="distinct clips cycled through")
    p.add_argument("--batch-size", type=int, default=16, help="raw batch = service max batch")
    p.add_argument("--raw-seconds", type=float, default=30.0, help="raw: seconds per model")
    p.add_argument("--duration", type=float, default=20.0, help="HTTP: measured s per level")
    p.add_argument("--warmup", type=float, default=5.0, help="HTTP: unmeasured s per level")
    p.add_argument("--levels", default="1,4,8,16,32,64", help="service concurrency sweep")
    p.add_argument("--baseline-levels", default="1,2,4,8", help="baseline concurrency sweep")
    p.add_argument("--overload-factor", type=int, default=10, help="x saturating concurrency")
    p.add_argument("--client-cpus", default="auto", help="taskset list for load.py; 'none'")
    p.add_argument(
        "--server-cpus",
        default="auto",
        help="CPUs for the servers *and* the raw engine (e.g. '0' on a 2-CPU machine, "
        "so that the load generator on the other steals nothing); 'auto': all but "
        "the generator's where more than 2",
    )
    p.add_argument("--skip", default="", help="comma-separated: raw,service,baseline,overload")
    p.add_argument("--note", default="", help="a line for the report (e.g. 'shared machine')")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help="writes OUT.md + OUT.json")
    p.add_argument("--quick", action="store_true", help="smoke run: 3 s levels, 2 levels per sweep")
    if "--quick" in (sys.argv[1:] if argv is None else argv):  # explicit options still win
        p.set_defaults(
            raw_seconds=4.0, duration=3.0, warmup=1.0, levels="4,16", baseline_levels="1,4"
        )
    return p.parse_args(argv)


# --- the machine -------------------------------------------------------------------------------


def machine() -> dict:
    """CPU model, cores, the int8 instructions ONNX Runtime can use, library versions."""
    info: dict = {"cpu": cpu_model(), "cpus": os.cpu_count()}
    int8_sets = {"avx512_vnni", "avx_vnni", "amx_int8"}
    info["vnni"] = sorted(cpu_flags() & int8_sets) or ["none"]
    info["onnxruntime"] = ort.__version__
    info["python"] = platform.python_version()
    return info


def pinning(args: argparse.Namespace) -> tuple[str | None, str | None, str]:
    """(load generator CPUs, server CPUs, a sentence for the report)."""
    n = os.cpu_count() or 1
    if args.client_cpus == "none" or n == 1:
        return None, None, "load generator not pinned"
    client = str(n - 1) if args.client_cpus == "auto" else args.client_cpus
    if args.server_cpus != "auto":
        servers = args.server_cpus
        return (
            client,
            servers,
            (
                f"load generator pinned to CPU {client}; servers and the raw engine pinned to CPUs "
                f"{servers} (ONNX Runtime threads = their count): the generator steals no server "
                "core; the seed-style baseline keeps its own torch.set_num_threads(2)"
            ),
        )
    if n > 2 and args.client_cpus == "auto":
        servers = f"0-{n - 2}"
        return client, servers, f"load generator pinned to CPU {client}, servers to CPUs {servers}"
    return (
        client,
        None,
        (
            f"load generator pinned to CPU {client} (taskset); servers unpinned: with {n} CPUs the "
            "generator still shares one core with them"
        ),
    )


def taskset(cpus: str | None) -> list[str]:
    return ["taskset", "-c", cpus] if cpus and shutil.which("taskset") else []


# --- clips -------------------------------------------------------------------------------------


def clip_files(folder: Path, n: int) -> list[Path]:
    files = sorted(p for p in folder.glob("*") if p.suffix.lower() in AUDIO_SUFFIXES)
    if not files:
        raise SystemExit(f"no audio clips in {folder} (pass --clips)")
    return files[:n]


def write_wavs(files: list[Path], folder: Path) -> Path:
    """The clips re-encoded as 16-bit PCM WAV at their own rate (the official ESC-50 format)."""
    folder.mkdir(parents=True, exist_ok=True)
    for f in files:
        x, sr = sf.read(f, dtype="int16")
        sf.write(folder / f"{f.stem}.wav", x, sr, format="WAV", subtype="PCM_16")
    return folder


def decoded_batch(files: list[Path], batch: int, clip_samples: int, rate: int) -> np.ndarray:
    from contract.audio import read_audio

    x = np.zeros((batch, clip_samples), np.float32)  # (B, clip), pre-decoded
    for i in range(batch):
        w = read_audio(files[i % len(files)], rate).waveform[:clip_samples]
        x[i, : len(w)] = w
    return x


# --- 1. raw engine -----------------------------------------------------------------------------


def session(path: Path, threads: int = 0, profile: str | None = None) -> ort.InferenceSession:
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")  # as the service
    if profile:
        so.enable_profiling, so.profile_file_prefix = True, profile
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def bench_raw(
    models: dict[str, Path], x: np.ndarray, seconds: float, threads: int = 0
) -> dict[str, dict]:
    """Clips/s of each model on the same batch, alternating models every ~1 s round."""
    sessions = {v: session(p, threads) for v, p in models.items()}
    for s in sessions.values():
        s.run(None, {"waveform": x})  # warm-up
    times: dict[str, list[float]] = defaultdict(list)
    t_end = time.perf_counter() + seconds * len(models)
    while time.perf_counter() < t_end:
        for v, s in sessions.items():
            round_end = time.perf_counter() + 1.0
            while True:
                t = time.perf_counter()
                s.run(None, {"waveform": x})
                times[v].append(time.perf_counter() - t)
                if t > round_end:
                    break
    out = {}
    for v, ts in times.items():
        ms = np.asarray(ts) * 1e3
        out[v] = {
            "model": models[v].name,
            "batch": len(x),
            "batches": len(ts),
            "clips_per_s": len(x) * len(ts) / sum(ts),
            "p50_ms": float(np.percentile(ms, 50)),
            "p99_ms": float(np.percentile(ms, 99)),
        }
    return out


def profile_by_op(path: Path, x: np.ndarray, runs: int = 3) -> list[tuple[str, float]]:
    """ORT profiler: ms per clip by operator type (after ORT's graph optimisations)."""
    with tempfile.TemporaryDirectory() as tmp:
        s = session(path, profile=str(Path(tmp) / "prof"))
        for _ in range(runs + 1):
            s.run(None, {"waveform": x})
        events = json.loads(Path(s.end_profiling()).read_text())
    per_op: dict[str, float] = defaultdict(float)
    for e in events:
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time"):
            per_op[e["args"]["op_name"]] += e["dur"] / 1e3 / (runs + 1) / len(x)
    return sorted(per_op.items(), key=lambda kv: -kv[1])


# --- servers and load --------------------------------------------------------------------------


@contextlib.contextmanager
def server(cmd: list[str], ready_path: str, port: int, env: dict | None = None) -> Iterator[str]:
    """`cmd` serving on `port` with the settings in `env` only (none of the shell's ESC50_*)."""
    base = f"http://127.0.0.1:{port}"
    proc = subprocess.Popen(cmd, cwd=REPO, env=clean_env(**(env or {})), stdout=subprocess.DEVNULL)
    try:
        try:
            wait_ready(base, exited(proc), path=ready_path)
        except NotReady as e:
            raise SystemExit(str(e)) from None
        yield base
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()


def cpu_count(cpus: str) -> int:
    """Number of CPUs in a taskset list such as '0', '0-2' or '0,2'."""
    return len(cpu_set(cpus))


def cpu_set(cpus: str) -> set[int]:
    out: set[int] = set()
    for part in cpus.split(","):
        lo, _, hi = part.partition("-")
        out.update(range(int(lo), int(hi or lo) + 1))
    return out


def service(
    model: Path, args: argparse.Namespace, cpus: str | None
) -> contextlib.AbstractContextManager[str]:
    port = free_port()
    threads = (
        {"ESC50_INTRA_OP_THREADS": str(cpu_count(cpus))}
        if args.server_cpus != "auto" and cpus
        else {}
    )
    env = {
        **threads,
        "ESC50_MODEL_PATH": str(model),
        "ESC50_HOST": "127.0.0.1",
        "ESC50_PORT": str(port),
        "ESC50_MAX_BATCH_SIZE": str(args.batch_size),
        "ESC50_LOG_LEVEL": "warning",
    }
    return server([*taskset(cpus), sys.executable, "-m", "service"], "/readyz", port, env)


def baseline(cpus: str | None) -> contextlib.AbstractContextManager[str]:
    port = free_port()
    cmd = [
        *taskset(cpus),
        sys.executable,
        str(SEED_SERVER),
        "--port",
        str(port),
    ]
    return server(cmd, "/health", port)


def load(url: str, mode: str, clips: Path, concurrency: int, args: argparse.Namespace) -> dict:
    """One closed-loop run of loadtests/load.py; its JSON line."""
    cmd = [
        *taskset(args.client_cpu_list),
        sys.executable,
        str(LOAD_PY),
        "--url",
        url,
        "--mode",
        mode,
        "--clips",
        str(clips),
        "--max-clips",
        str(args.max_clips),
        "--concurrency",
        str(concurrency),
        "--duration",
        str(args.duration),
        "--warmup",
        str(args.warmup),
    ]
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    lines = [ln for ln in done.stdout.splitlines() if ln.startswith("{")]
    if done.returncode or not lines:
        raise SystemExit(f"load.py failed ({done.returncode}): {done.stderr[-2000:]}")
    result = json.loads(lines[0])
    print(f"  {url.rsplit('/', 1)[-1]} {mode} c={concurrency}: {done.stdout.splitlines()[-1]}")
    return result


def sweep(url: str, mode: str, clips: Path, levels: list[int], args) -> list[dict]:
    return [load(url, mode, clips, c, args) for c in levels]


def scrape(base: str) -> dict[str, float]:
    """The service's own counters: batches, queue-wait buckets, its CPU seconds."""
    wanted = ("esc50_batch_size_", "esc50_queue_duration_seconds_", "process_cpu_seconds_total")
    return {k: v for k, v in scrape_metrics(base).items() if k.startswith(wanted)}


def server_view(before: dict[str, float], after: dict[str, float], wall_s: float) -> dict:
    """What the service saw during one run: mean batch, queue-wait p99 (accepted requests, as
    a histogram bucket bound), CPU cores used."""
    d = {k: after[k] - before.get(k, 0.0) for k in after}
    batches = d.get("esc50_batch_size_count", 0.0)
    waits = d.get("esc50_queue_duration_seconds_count", 0.0)
    bounds = sorted(
        (float(k.split('le="')[1].rstrip('"}')), v)
        for k, v in d.items()
        if k.startswith("esc50_queue_duration_seconds_bucket") and "+Inf" not in k
    )
    p99 = next((le for le, n in bounds if n >= 0.99 * waits), None) if waits else None
    return {
        "mean_batch": d.get("esc50_batch_size_sum", 0.0) / batches if batches else None,
        "queue_wait_p99_le_s": p99,
        "server_cores": d.get("process_cpu_seconds_total", 0.0) / wall_s,
    }


def load_watched(base: str, url: str, mode: str, clips: Path, c: int, args) -> dict:
    """`load` with the service's own view of the run beside the client's."""
    before, t0 = scrape(base), time.perf_counter()
    result = load(url, mode, clips, c, args)
    result["server"] = server_view(before, scrape(base), time.perf_counter() - t0)
    return result


def saturation(rows: list[dict]) -> dict:
    """The lowest concurrency that reaches 95% of the sweep's best goodput."""
    peak = max(r["rps"] for r in rows)
    return next(r for r in rows if r["rps"] >= 0.95 * peak)


# --- the run -----------------------------------------------------------------------------------


def run(args: argparse.Namespace) -> dict:
    skip = set(filter(None, args.skip.split(",")))
    client, servers, pin_text = pinning(args)
    args.client_cpu_list = client
    prefix = REPO / args.models
    models = {v: Path(f"{prefix}.{v}.onnx") for v in ("fp32", "int8")}
    missing = [str(p) for p in models.values() if not p.is_file()]
    if missing:
        raise SystemExit(f"missing {', '.join(missing)}: run `make export` first")
    if args.clips == DEFAULT_CLIPS and not DEFAULT_CLIPS.is_dir():
        print(f"no ESC-50 clips at {DEFAULT_CLIPS}: sending the generated {BUNDLED_CLIPS}")
        args.clips = BUNDLED_CLIPS
    files = clip_files(args.clips, args.max_clips)
    report: dict = {
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "command": " ".join(["python -m loadtests.bench", *map(shlex.quote, args.argv)]),
        "machine": machine(),
        "pinning": pin_text,
        "note": args.note,
        "settings": {k: v for k, v in vars(args).items() if k not in ("argv", "client_cpu_list")},
    }
    if "raw" not in skip:
        from contract.metadata import read_onnx_metadata

        meta = read_onnx_metadata(models["int8"])
        x = decoded_batch(files, args.batch_size, meta.clip_samples, meta.sample_rate)
        print("raw ONNX Runtime (fp32 and int8 alternating) ...", flush=True)
        if args.server_cpus != "auto" and servers and hasattr(os, "sched_setaffinity"):
            everything = os.sched_getaffinity(0)
            os.sched_setaffinity(0, cpu_set(servers))  # the raw engine gets the servers' cores
            try:
                report["raw"] = bench_raw(models, x, args.raw_seconds, cpu_count(servers))
            finally:
                os.sched_setaffinity(0, everything)
        else:
            report["raw"] = bench_raw(models, x, args.raw_seconds)
        report["int8_profile"] = profile_by_op(models["int8"], x)
    with tempfile.TemporaryDirectory() as tmp:
        wavs = write_wavs(files, Path(tmp) / "wav")
        if not {"service", "overload"} <= skip:
            print("service (int8) ...", flush=True)
            with service(models["int8"], args, servers) as base:
                url = f"{base}/v1/classify"
                levels = [int(c) for c in args.levels.split(",")]
                if "service" not in skip:
                    report["service_wav"] = [
                        load_watched(base, url, "raw", wavs, c, args) for c in levels
                    ]
                    sat = saturation(report["service_wav"])
                    report["service_as_sent"] = load(
                        url, "raw", args.clips, sat["concurrency"], args
                    )
                else:
                    sat = load_watched(base, url, "raw", wavs, max(levels), args)
                if "overload" not in skip:
                    c = args.overload_factor * sat["concurrency"]
                    run = load_watched(base, url, "raw", wavs, c, args)
                    report["overload"] = {"saturation": sat, "run": run}
        if "baseline" not in skip and not SEED_SERVER.is_file():
            report["baseline_skipped"] = f"no {SEED_SERVER} (it ships beside this repository)"
            print(f"seed-style baseline skipped: {report['baseline_skipped']}", flush=True)
        elif "baseline" not in skip:
            print("seed-style baseline ...", flush=True)
            with baseline(servers) as base:
                levels = [int(c) for c in args.baseline_levels.split(",")]
                report["baseline"] = sweep(f"{base}/inference", "b64json", wavs, levels, args)
    report["targets"] = check_targets(report)
    return report


def check_targets(r: dict) -> list[dict]:
    """Each issue-11 target the run measured: figure, target, met."""
    out = []

    def add(name: str, value: float, target: float, at_most: bool = False) -> None:
        met = value <= target if at_most else value >= target
        out.append({"target": name, "value": value, "goal": target, "at_most": at_most, "met": met})

    raw = r.get("raw", {})
    if raw:
        add(
            "int8_vs_fp32",
            raw["int8"]["clips_per_s"] / raw["fp32"]["clips_per_s"],
            TARGETS["int8_vs_fp32"],
        )
    if raw and r.get("service_wav"):
        best = max(row["rps"] for row in r["service_wav"])
        add(
            "service_vs_raw_int8", best / raw["int8"]["clips_per_s"], TARGETS["service_vs_raw_int8"]
        )
    if r.get("service_wav") and r.get("baseline"):
        best = max(row["rps"] for row in r["service_wav"])
        base = max(row["rps"] for row in r["baseline"])
        add("service_vs_baseline", best / max(base, 1e-9), TARGETS["service_vs_baseline"])
    if r.get("overload"):
        sat, over = r["overload"]["saturation"], r["overload"]["run"]
        add("overload_goodput", over["rps"] / max(sat["rps"], 1e-9), TARGETS["overload_goodput"])
        if over["p99_ms"] and sat["p99_ms"]:
            add("overload_p99", over["p99_ms"] / sat["p99_ms"], TARGETS["overload_p99"], True)
    return out


# --- the report --------------------------------------------------------------------------------


def load_table(rows: list[dict]) -> list[str]:
    """Closed-loop runs. 'client cores': load.py's CPU time over its wall time; for the service,
    what it saw itself: mean batch, queue wait p99 of accepted requests, CPU cores used."""
    lines = [
        "| clients | req/s | p50 ms | p95 ms | p99 ms | failed | client cores "
        "| mean batch | queue wait p99 | server cores |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        failed = ", ".join(f"{k}: {v}" for k, v in r["failed"].items()) or "0"
        cores = r["client_cpu_s"] / max(r["client_wall_s"], 1e-9)
        srv = r.get("server") or {}
        batch = f"{srv['mean_batch']:.1f}" if srv.get("mean_batch") else "-"
        wait = f"<= {srv['queue_wait_p99_le_s']:g} s" if srv.get("queue_wait_p99_le_s") else "-"
        srv_cores = f"{srv['server_cores']:.2f}" if srv else "-"
        lines.append(
            f"| {r['concurrency']} | {r['rps']:.1f} | {r['p50_ms']} | {r['p95_ms']} "
            f"| {r['p99_ms']} | {failed} | {cores:.2f} | {batch} | {wait} | {srv_cores} |"
        )
    return lines


def client_bound_note(sat: dict, run: dict) -> list[str]:
    """A sentence when the load generator, not the service, limited the overload run."""
    per_request = [
        r["client_cpu_s"] / max(r["ok"] + sum(r["failed"].values()), 1) for r in (sat, run)
    ]
    cores = run["client_cpu_s"] / max(run["client_wall_s"], 1e-9)
    if cores < 0.7 or per_request[1] < 2 * per_request[0]:
        return []
    return [
        "",
        f"The load generator was busy {cores:.2f} of a core and spent "
        f"{per_request[1] * 1e3:.0f} ms of CPU per answer ({per_request[0] * 1e3:.1f} ms at "
        "saturation): with this many "
        "connections it, not the service, limits the request rate (compare the service's mean "
        "batch and CPU cores with the saturation row).",
    ]


def markdown(r: dict) -> str:
    m = r["machine"]
    out = [
        "# Benchmark: raw engine, service, seed-style baseline, overload",
        "",
        f"- date: {r['date']}",
        f"- command: `{r['command']}`",
        f"- machine: {m['cpu']}, {m['cpus']} CPUs, int8 dot-product instructions: "
        f"{', '.join(m.get('vnni', ['unknown']))}; onnxruntime {m['onnxruntime']}, "
        f"Python {m['python']}",
        f"- {r['pinning']}",
    ]
    if r["note"]:
        out.append(f"- note: {r['note']}")
    if r.get("targets"):
        out += ["", "## Targets (issue 11)", "", "| target | measured | goal | met |"]
        out.append("|---|---|---|---|")
        for t in r["targets"]:
            goal = ("<= " if t["at_most"] else ">= ") + f"{t['goal']:g}"
            out.append(
                f"| {t['target']} | {t['value']:.2f} | {goal} | {'yes' if t['met'] else 'no'} |"
            )
    if raw := r.get("raw"):
        out += ["", "## Raw ONNX Runtime (pre-decoded real clips, models alternating)", ""]
        out += [
            "| model | batch | clips/s | batch p50 ms | batch p99 ms |",
            "|---|---|---|---|---|",
        ]
        for v in raw.values():
            out.append(
                f"| {v['model']} | {v['batch']} | {v['clips_per_s']:.1f} | {v['p50_ms']:.0f} "
                f"| {v['p99_ms']:.0f} |"
            )
        out += ["", "int8 graph, ORT profiler, ms per clip by operator:", ""]
        out += ["| operator | ms/clip |", "|---|---|"]
        out += [f"| {op} | {ms:.3f} |" for op, ms in r["int8_profile"] if ms >= 0.005]
    if r.get("service_wav"):
        out += ["", "## Service (int8), 16-bit WAV uploads", "", *load_table(r["service_wav"])]
        out += ["", "As sent (the clips' own FLAC / Ogg, decode included), at saturation:", ""]
        out += load_table([r["service_as_sent"]])
    if r.get("baseline"):
        out += ["", "## Seed-style baseline (../shared/bench/seed_server.py, base64 JSON)", ""]
        out += load_table(r["baseline"])
    elif r.get("baseline_skipped"):
        out += ["", f"Seed-style baseline: skipped, {r['baseline_skipped']}."]
    if over := r.get("overload"):
        out += [
            "",
            f"## Overload: {over['run']['concurrency']} clients "
            f"({over['run']['concurrency'] // over['saturation']['concurrency']}x the "
            "saturating concurrency)",
            "",
        ]
        out += load_table([over["saturation"], over["run"]])
        out += client_bound_note(over["saturation"], over["run"])
    return "\n".join(out) + "\n"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    args.argv = sys.argv[1:] if argv is None else argv
    report = run(args)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    Path(f"{args.out}.json").write_text(json.dumps(report, indent=2, default=str) + "\n")
    text = markdown(report)
    Path(f"{args.out}.md").write_text(text)
    print(text)
    print(f"wrote {args.out}.md and {args.out}.json")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
