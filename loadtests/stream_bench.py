"""How many concurrent real-time streams one replica sustains (hop 1 s), and what /v1/classify
traffic alongside them sees. Writes loadtests/reports/streams.md.

    .venv/bin/python -m loadtests.stream_bench [--levels 8,16,32,48] [--seconds 20]

Starts `python -m service` (the shipped int8 model) on a free port. At each level, N streams
send 16 kHz audio in 0.1 s messages at real time, and one client posts 5 s clips to
/v1/classify back to back. A level is sustained when no window was skipped and the p99 event
latency (last sample of the window sent -> its event received) is under the hop. The clients
run on the same machine as the service, so they take CPU from it: a lower bound.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import soundfile as sf
from websockets.asyncio.client import connect

from contract.machine import cpu_model
from loadtests.local import clean_env, exited, free_port, wait_ready

REPO = Path(__file__).resolve().parent.parent
RATE, CHUNK_S, HOP_S = 16000, 0.1, 1.0


async def one_stream(url: str, seconds: float, seed: int, out: dict) -> None:
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal(int(seconds * RATE)) * 3000).astype("<i2")
    step, sent_at = int(CHUNK_S * RATE), {}
    async with connect(url) as ws:
        await ws.send(json.dumps({"sample_rate": RATE, "hop_s": HOP_S}))
        await ws.recv()  # start

        async def receive() -> None:
            async for m in ws:
                e = json.loads(m)
                if e["type"] == "window":
                    end = round(e["end_s"] * RATE)
                    out["latency"].append(time.monotonic() - sent_at.get(end, time.monotonic()))
                    out["skipped"] += e["skipped"]
                elif e["type"] == "end":
                    out["skipped_total"] += e["skipped"]

        reader = asyncio.create_task(receive())
        t0 = time.monotonic()
        for i in range(0, len(x), step):
            await asyncio.sleep(max(0.0, t0 + (i + step) / RATE - time.monotonic()))
            await ws.send(x[i : i + step].tobytes())
            sent_at[min(i + step, len(x))] = time.monotonic()
        await ws.send(json.dumps({"type": "end"}))
        await reader


async def classify_loop(base: str, stop: asyncio.Event, out: dict) -> None:
    buf = io.BytesIO()
    sf.write(buf, np.random.default_rng(0).standard_normal(5 * 44100) * 0.1, 44100, format="WAV")
    async with httpx.AsyncClient(timeout=30) as client:
        while not stop.is_set():
            t0 = time.monotonic()
            r = await client.post(f"{base}/v1/classify", content=buf.getvalue())
            out["classify"].append((r.status_code, time.monotonic() - t0))


async def level(base: str, n: int, seconds: float) -> dict:
    out: dict = {"latency": [], "skipped": 0, "skipped_total": 0, "classify": []}
    url = base.replace("http", "ws") + "/v1/stream"
    stop = asyncio.Event()
    poster = asyncio.create_task(classify_loop(base, stop, out))
    await asyncio.gather(*(one_stream(url, seconds, s, out) for s in range(n)))
    stop.set()
    await poster
    lat = np.array(out["latency"]) if out["latency"] else np.array([np.nan])
    ok = [t for s, t in out["classify"] if s == 200]
    return {
        "streams": n,
        "windows": len(out["latency"]),
        "skipped": out["skipped_total"],
        "p50": float(np.percentile(lat, 50)),
        "p99": float(np.percentile(lat, 99)),
        "classify_ok": len(ok),
        "classify_other": len(out["classify"]) - len(ok),
        "classify_p50": float(np.percentile(ok, 50)) if ok else float("nan"),
        "classify_p99": float(np.percentile(ok, 99)) if ok else float("nan"),
    }


LOAD_AT_START = os.getloadavg()[0]  # other work on the machine, said in the report


def write_report(rows: list[dict], command: str, out: Path) -> None:
    lines = [
        "# Concurrent live streams on one replica",
        "",
        f"Command: `{command}`",
        f"CPU: {cpu_model()} ({os.cpu_count()} CPUs), 1-min load average {LOAD_AT_START:.2f} "
        "before the run; the stream and",
        "classify clients ran on the same machine. The shipped int8 model, default settings.",
        "Each stream: 16 kHz mono, 0.1 s messages at real time, hop 1 s; alongside, one client",
        "posting a 5 s clip to /v1/classify back to back.",
        "",
        "| streams | windows | skipped | event p50 (s) | event p99 (s) | sustained | "
        "classify 200s | classify other | classify p50 (s) | classify p99 (s) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        ok = r["skipped"] == 0 and r["p99"] < HOP_S
        lines.append(
            f"| {r['streams']} | {r['windows']} | {r['skipped']} | {r['p50']:.3f} | "
            f"{r['p99']:.3f} | {'yes' if ok else 'no'} | {r['classify_ok']} | "
            f"{r['classify_other']} | {r['classify_p50']:.3f} | {r['classify_p99']:.3f} |"
        )
    best = max((r["streams"] for r in rows if r["skipped"] == 0 and r["p99"] < HOP_S), default=0)
    lines += ["", f"Most streams sustained (no skipped window, p99 under {HOP_S:g} s): {best}.", ""]
    report = out.with_suffix(".md")
    report.parent.mkdir(parents=True, exist_ok=True)
    report.write_text("\n".join(lines))
    print("\n".join(lines))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--levels", default="8,16,32,48")
    p.add_argument("--seconds", type=float, default=20.0)
    p.add_argument(
        "--out", type=Path, default=REPO / "build" / "streams", help="report path, no suffix"
    )
    args = p.parse_args()
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    model = REPO / "models" / "esc50-resnet34.int8.onnx"
    env = clean_env(ESC50_MODEL_PATH=str(model), ESC50_PORT=str(port), ESC50_LOG_LEVEL="warning")
    proc = subprocess.Popen([sys.executable, "-m", "service"], env=env, cwd=REPO)
    try:
        wait_ready(base, exited(proc), 120)
        rows = [asyncio.run(level(base, int(n), args.seconds)) for n in args.levels.split(",")]
    finally:
        proc.terminate()
        proc.wait(30)
    write_report(rows, "python -m loadtests.stream_bench " + " ".join(sys.argv[1:]), args.out)


if __name__ == "__main__":
    main()
