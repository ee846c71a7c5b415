"""Lightweight closed-loop HTTP load generator (loopback only).

A copy of ../shared/bench/load.py (the load generator the project's figures were measured with),
so that `make bench` runs from a fresh clone: ruff-formatted and one lambda made a def, the
behaviour unchanged.

N workers each send one request, wait for the answer, send the next. Request
bodies are built once up front, so the per-request client cost is just HTTP.
Only completions inside the measurement window (after --warmup, before
--warmup + --duration) count toward throughput and latency.

    python load.py --url http://127.0.0.1:8101/inference --mode b64json \
        --clips shared/esc50/audio --concurrency 4 --duration 30 --warmup 5
"""

import argparse
import asyncio
import base64
import glob
import itertools
import json
import math
import os
import resource
import time
from collections import Counter
from pathlib import Path
from urllib.parse import urlsplit

import httpx

CTYPES = {".wav": "audio/wav", ".flac": "audio/flac", ".ogg": "audio/ogg", ".mp3": "audio/mpeg"}
LOOPBACK = {"127.0.0.1", "localhost", "::1"}


def load_bodies(spec, mode, limit):
    paths = (
        sorted(p for p in Path(spec).iterdir() if p.suffix.lower() in CTYPES)
        if os.path.isdir(spec)
        else sorted(map(Path, glob.glob(spec)))
    )[:limit]
    if not paths:
        raise SystemExit(f"no audio files match {spec!r}")
    bodies = []
    for p in paths:
        data = p.read_bytes()
        if mode == "raw":
            bodies.append((data, CTYPES.get(p.suffix.lower(), "application/octet-stream")))
        else:
            body = json.dumps({"audio_data": base64.b64encode(data).decode()}).encode()
            bodies.append((body, "application/json"))
    return bodies


def pct(sorted_ms, q):  # nearest-rank percentile
    return sorted_ms[max(0, math.ceil(q / 100 * len(sorted_ms)) - 1)] if sorted_ms else None


async def run(args, bodies):
    counter, lat, status = itertools.count(), [], Counter()
    sent = 0
    limits = httpx.Limits(
        max_connections=args.concurrency, max_keepalive_connections=args.concurrency
    )
    async with httpx.AsyncClient(timeout=args.timeout, limits=limits, trust_env=False) as client:
        t0 = time.perf_counter()
        w0, w1 = t0 + args.warmup, t0 + args.warmup + args.duration

        async def worker():
            nonlocal sent
            while time.perf_counter() < w1 and sent < args.max_requests:
                sent += 1
                body, ctype = bodies[next(counter) % len(bodies)]
                start = time.perf_counter()
                try:
                    r = await client.post(args.url, content=body, headers={"content-type": ctype})
                    await r.aread()
                    key = r.status_code
                except httpx.TimeoutException:
                    key = "timeout"
                except httpx.HTTPError as e:
                    key = type(e).__name__
                end = time.perf_counter()
                if w0 <= end <= w1:
                    status[key] += 1
                    if key == 200:
                        lat.append((end - start) * 1e3)

        await asyncio.gather(*(worker() for _ in range(args.concurrency)))
        wall = time.perf_counter() - t0
    return lat, status, wall


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--url", default="http://127.0.0.1:8101/inference")
    ap.add_argument("--mode", choices=["raw", "b64json"], default="b64json")
    ap.add_argument("--clips", required=True, help="directory or glob of audio files")
    ap.add_argument("--max-clips", type=int, default=1000)
    ap.add_argument("--concurrency", type=int, default=1)
    ap.add_argument("--duration", type=float, default=30.0, help="measured seconds")
    ap.add_argument("--warmup", type=float, default=5.0, help="unmeasured seconds first")
    ap.add_argument("--timeout", type=float, default=30.0, help="per request, seconds")
    ap.add_argument("--max-requests", type=int, default=200_000, help="hard cap on requests sent")
    args = ap.parse_args()
    if urlsplit(args.url).hostname not in LOOPBACK:
        raise SystemExit("refusing: load.py only targets loopback (127.0.0.1 / localhost / ::1)")

    bodies = load_bodies(args.clips, args.mode, args.max_clips)
    ru0 = resource.getrusage(resource.RUSAGE_SELF)
    lat, status, wall = asyncio.run(run(args, bodies))
    ru1 = resource.getrusage(resource.RUSAGE_SELF)
    cpu = (ru1.ru_utime - ru0.ru_utime) + (ru1.ru_stime - ru0.ru_stime)

    lat.sort()
    ok = status.pop(200, 0)

    def r(v):
        return None if v is None else round(v, 1)

    res = {
        "url": args.url,
        "mode": args.mode,
        "clips": len(bodies),
        "concurrency": args.concurrency,
        "duration_s": args.duration,
        "warmup_s": args.warmup,
        "ok": ok,
        "failed": {str(k): v for k, v in sorted(status.items(), key=str)},
        "rps": round(ok / args.duration, 2),
        "p50_ms": r(pct(lat, 50)),
        "p95_ms": r(pct(lat, 95)),
        "p99_ms": r(pct(lat, 99)),
        "max_ms": r(lat[-1] if lat else None),
        "client_cpu_s": round(cpu, 2),
        "client_wall_s": round(wall, 1),
    }
    print(json.dumps(res))
    print(
        f"c={args.concurrency} {args.mode}: {ok} ok, failed {res['failed'] or 0}, "
        f"{res['rps']} req/s | p50 {res['p50_ms']} p95 {res['p95_ms']} p99 {res['p99_ms']} "
        f"max {res['max_ms']} ms | client CPU {res['client_cpu_s']} s over {res['client_wall_s']} s"
    )


if __name__ == "__main__":
    main()
