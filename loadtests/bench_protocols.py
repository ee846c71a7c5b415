"""`python -m loadtests.bench_protocols`: /v1/classify, v2 REST (binary data) and v2 gRPC
throughput at saturation on the same clips, against one `python -m service` (the shipped int8
model, default settings, gRPC on a free port). Writes build/protocols.{md,json} (the committed
report: `--out loadtests/reports/protocols`) with the CPU model, the command and the date.

Closed loop: `--concurrency` workers per protocol, each sending the next clip as soon as its
answer is in; the protocols take turns round by round (`--rounds` x `--seconds`), so a shared
machine's noise hits all three alike. Every request carries the encoded file (decode on the
server for all three). The load generator runs in this process, on the same CPUs as the server
where the machine has two (the report says so).
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import tritonclient.grpc.aio as tga
from tritonclient.utils import InferenceServerException

from loadtests.local import clean_env, free_port, wait_ready
from loadtests.local import exited as process_exited

REPO = Path(__file__).resolve().parent.parent
MODEL = "esc50-resnet34"
PROTOCOLS = ("v1", "v2-rest-binary", "v2-grpc")


def cpu_model() -> str:
    out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    for line in out.splitlines():
        if line.startswith("Model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def clips(n: int) -> list[bytes]:
    esc50 = REPO.parent / "shared" / "esc50" / "audio"
    folder = esc50 if esc50.is_dir() else REPO / "loadtests" / "clips"
    return [p.read_bytes() for p in sorted(folder.iterdir())[:n]]


def v2_binary_body(clip: bytes) -> tuple[bytes, dict[str, str]]:
    element = len(clip).to_bytes(4, "little") + clip
    head = json.dumps(
        {
            "inputs": [
                {
                    "name": "audio",
                    "datatype": "BYTES",
                    "shape": [1],
                    "parameters": {"binary_data_size": len(element)},
                }
            ],
            "outputs": [{"name": "probabilities", "parameters": {"binary_data": True}}],
        }
    ).encode()
    return head + element, {"Inference-Header-Content-Length": str(len(head))}


async def run_protocol(proto: str, base: str, grpc_url: str, bodies: list[bytes], args) -> dict:
    """`concurrency` closed-loop workers for `seconds`: answers/s and latency percentiles."""
    latencies: list[float] = []
    refused = errors = 0
    stop = time.monotonic() + args.seconds
    limits = httpx.Limits(max_connections=args.concurrency)
    async with httpx.AsyncClient(base_url=base, timeout=60, limits=limits) as http:
        grpc_client = tga.InferenceServerClient(grpc_url)

        async def one(clip: bytes) -> int:
            """The answer's status: 200, 503 (refused for overload), else a failure."""
            if proto == "v1":
                r = await http.post(
                    "/v1/classify", content=clip, headers={"content-type": "audio/wav"}
                )
                return r.status_code
            if proto == "v2-rest-binary":
                body, headers = v2_binary_body(clip)
                r = await http.post(f"/v2/models/{MODEL}/infer", content=body, headers=headers)
                return r.status_code
            x = tga.InferInput("audio", [1], "BYTES")
            x.set_data_from_numpy(np.array([clip], dtype=np.object_))
            try:
                result = await grpc_client.infer(MODEL, [x])
            except InferenceServerException as e:
                return 503 if e.status() == "StatusCode.UNAVAILABLE" else 500
            return 200 if result.as_numpy("probabilities") is not None else 500

        async def worker(k: int) -> None:
            nonlocal errors, refused
            i = k
            while time.monotonic() < stop:
                t0 = time.perf_counter()
                try:
                    status = await one(bodies[i % len(bodies)])
                except Exception:
                    status = 0
                if status == 200:
                    latencies.append(time.perf_counter() - t0)
                elif status == 503:  # refused for overload: back off a little, as clients do
                    refused += 1
                    await asyncio.sleep(0.05)
                else:
                    errors += 1
                i += args.concurrency

        t0 = time.perf_counter()
        await asyncio.gather(*(worker(k) for k in range(args.concurrency)))
        wall = time.perf_counter() - t0
        await grpc_client.close()
    ms = sorted(1000 * x for x in latencies)
    pick = lambda q: round(ms[min(len(ms) - 1, int(q * len(ms)))], 1) if ms else None  # noqa: E731
    return {
        "protocol": proto,
        "ok": len(ms),
        "refused_503": refused,
        "errors": errors,
        "rps": round(len(ms) / wall, 2),
        "p50_ms": pick(0.5),
        "p99_ms": pick(0.99),
    }


def start_service(port: int, grpc_port: int, isolate: bool) -> subprocess.Popen:
    env = clean_env(
        ESC50_HOST="127.0.0.1",
        ESC50_PORT=str(port),
        ESC50_GRPC_PORT=str(grpc_port),
        ESC50_LOG_LEVEL="warning",
        **({"ESC50_INTRA_OP_THREADS": "1"} if isolate else {}),
    )
    pin = (lambda: os.sched_setaffinity(0, {SERVER_CPU})) if isolate else None
    return subprocess.Popen([sys.executable, "-m", "service"], cwd=REPO, env=env, preexec_fn=pin)


# --isolate: the service on CPU 0 (one ONNX Runtime thread), this load generator on CPU 1, so
# that a client library's own cost (Python HTTP/1.1 parsing in httpx against tritonclient's
# C-core gRPC) does not show up as the server's: the figures compare what each protocol costs
# the service.
SERVER_CPU, CLIENT_CPU = 0, 1


async def measure(base: str, grpc_url: str, args) -> list[dict]:
    bodies = clips(args.clips)
    warm = argparse.Namespace(**{**vars(args), "seconds": args.warmup_s})
    for proto in PROTOCOLS:
        await run_protocol(proto, base, grpc_url, bodies, warm)
    rows = []
    for r in range(args.rounds):
        for proto in PROTOCOLS:
            row = await run_protocol(proto, base, grpc_url, bodies, args)
            rows.append({"round": r + 1, **row})
            print(json.dumps(rows[-1]), flush=True)
    return rows


def summary(rows: list[dict]) -> dict:
    per = {p: [r for r in rows if r["protocol"] == p] for p in PROTOCOLS}
    rps = {p: round(statistics.mean(r["rps"] for r in rs), 2) for p, rs in per.items()}
    best = max(rps.values())
    return {
        "rps": rps,
        "vs_best_pct": {p: round(100 * (v - best) / best, 1) for p, v in rps.items()},
        "within_10pct": all(v >= 0.9 * best for v in rps.values()),
        "errors": sum(r["errors"] for r in rows),
    }


def markdown(report: dict) -> str:
    s, a = report["summary"], report["args"]
    lines = [
        "# /v1/classify vs v2 REST (binary) vs v2 gRPC at saturation",
        "",
        f"- Command: `{report['command']}`",
        f"- Date: {report['date']}; CPU: {report['cpu']} ({report['cpus']} CPUs); "
        + (
            "the service pinned to CPU 0 (one ONNX Runtime thread), the load generator to CPU 1"
            if a.get("isolate")
            else "the load generator ran on the same CPUs as the service"
        )
        + f"; 1-min load average {report['load_before']:.2f} before the run",
        f"- Service: `python -m service`, the shipped int8 model, default settings; "
        f"{a['clips']} real clips sent as their files (decode on the server for all three); "
        f"{a['concurrency']} closed-loop workers per protocol, {a['rounds']} rounds x "
        f"{a['seconds']} s each, protocols alternating; a worker refused (503) waits 50 ms",
        "",
        "| round | protocol | answers/s | p50 ms | p99 ms | 503s | failed |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in report["rows"]:
        lines.append(
            f"| {r['round']} | {r['protocol']} | {r['rps']} | {r['p50_ms']} | {r['p99_ms']} "
            f"| {r['refused_503']} | {r['errors']} |"
        )
    lines += ["", "| protocol | mean answers/s | vs best |", "|---|---|---|"]
    for p in PROTOCOLS:
        lines.append(f"| {p} | {s['rps'][p]} | {s['vs_best_pct'][p]} % |")
    verdict = "yes" if s["within_10pct"] else "no"
    lines += ["", f"Each within 10 % of the best: **{verdict}**; failed requests: {s['errors']}."]
    return "\n".join(lines) + "\n"


LOAD_BEFORE = os.getloadavg()[0]  # other work on the machine, said in the report


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--concurrency", type=int, default=6)
    ap.add_argument("--seconds", type=float, default=20)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--warmup-s", type=float, default=4)
    ap.add_argument("--clips", type=int, default=16)
    ap.add_argument("--isolate", action="store_true", help="server on CPU 0, clients on CPU 1")
    # build/ by default: a run never rewrites the committed report unless --out names it
    ap.add_argument("--out", type=Path, default=REPO / "build" / "protocols")
    args = ap.parse_args(argv)
    port, grpc_port = free_port(), free_port()
    proc = start_service(port, grpc_port, args.isolate)
    if args.isolate:
        os.sched_setaffinity(0, {CLIENT_CPU})
    base = f"http://127.0.0.1:{port}"
    try:
        wait_ready(base, process_exited(proc), 300)
        rows = asyncio.run(measure(base, f"127.0.0.1:{grpc_port}", args))
    finally:
        proc.terminate()
        proc.wait(60)
    report = {
        "command": shlex.join(
            ["python", "-m", "loadtests.bench_protocols", *(argv or sys.argv[1:])]
        ),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "cpu": cpu_model(),
        "cpus": os.cpu_count(),
        "load_before": LOAD_BEFORE,
        "args": {k: v for k, v in vars(args).items() if k != "out"},
        "rows": rows,
        "summary": summary(rows),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")
    args.out.with_suffix(".md").write_text(markdown(report))
    print(markdown(report))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
