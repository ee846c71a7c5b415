"""`python -m service.bench [MODEL.onnx ...]` (= `make bench`): the raw ONNX Runtime session on
pre-decoded batches vs the service end to end (real uvicorn on 127.0.0.1, concurrent clients),
at the same batch size. Prints a markdown table; `--json PATH` writes the figures too.

Both sides use the same session options and threads. The service side includes HTTP, decoding,
queueing and batching; the target is service throughput >= 85% of raw.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import onnxruntime as ort

from service.audio import decode
from service.backends.ort import OrtBackend
from service.settings import REPO_ROOT, Settings

DEFAULT_CLIPS = REPO_ROOT.parent / "shared" / "esc50" / "audio"
AUDIO_SUFFIXES = {".wav", ".flac", ".ogg", ".mp3"}
OCTET = {"content-type": "application/octet-stream"}  # the service sniffs the format


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m service.bench", description=__doc__)
    p.add_argument(
        "models", nargs="*", type=Path, help="ONNX files (default: fp32 + int8 in models/)"
    )
    p.add_argument("--batch-size", type=int, default=16, help="raw batch = service max_batch_size")
    p.add_argument("--batches", type=int, default=6, help="raw: timed batches")
    p.add_argument("--requests", type=int, default=0, help="service: requests (default batches*B)")
    p.add_argument("--concurrency", type=int, default=0, help="service: clients (default 2*B)")
    p.add_argument("--threads", type=int, default=0, help="ORT intra-op threads (0 = all cores)")
    p.add_argument("--max-wait-ms", type=float, default=Settings().max_wait_ms, help="batcher wait")
    p.add_argument("--clips", type=Path, default=DEFAULT_CLIPS, help="audio files to send")
    p.add_argument(
        "--encode", choices=("wav", "as-is"), default="wav",
        help="send 16-bit WAV (the official ESC-50 format) or the files' own encoding",
    )  # fmt: skip
    p.add_argument("--json", type=Path, help="also write the results here")
    return p.parse_args(argv)


def default_models() -> list[Path]:
    stem = Settings().model_dir / Settings().model_stem
    found = [Path(f"{stem}.{v}.onnx") for v in ("fp32", "int8")]
    found = [m for m in found if m.is_file()]
    if not found:
        raise SystemExit(f"no models at {stem}.{{fp32,int8}}.onnx: run `make export` or pass paths")
    return found


def as_wav(data: bytes) -> bytes:
    """Re-encode one clip as 16-bit PCM WAV at its own sample rate."""
    import io

    import soundfile as sf

    x, sr = sf.read(io.BytesIO(data), dtype="int16")
    buf = io.BytesIO()
    sf.write(buf, x, sr, format="WAV", subtype="PCM_16")
    return buf.getvalue()


def load_clips(folder: Path, n: int) -> list[bytes]:
    """n encoded clips: real ones from `folder` if present, else generated 5 s noise WAVs."""
    files = (
        sorted(p for p in folder.glob("*") if p.suffix in AUDIO_SUFFIXES) if folder.is_dir() else []
    )
    if files:
        return [files[i % len(files)].read_bytes() for i in range(n)]
    import io

    import soundfile as sf

    rng, out = np.random.default_rng(0), []
    for _ in range(n):
        buf = io.BytesIO()
        sf.write(
            buf, (0.1 * rng.standard_normal(5 * 44100)).astype(np.float32), 44100, format="WAV"
        )
        out.append(buf.getvalue())
    return out


def percentiles(latencies_s: list[float]) -> dict[str, float]:
    ms = np.asarray(latencies_s) * 1000
    return {f"p{q}_ms": float(np.percentile(ms, q)) for q in (50, 95, 99)}


# --- raw engine --------------------------------------------------------------------------------


def decode_ms_per_clip(clips: list[bytes]) -> float:
    """What the service pays per clip before inference and the raw side does not (1 thread)."""
    t0 = time.perf_counter()
    for c in clips:
        decode(c, 44100, 600)
    return (time.perf_counter() - t0) / len(clips) * 1000


def bench_raw(model: Path, clips: list[bytes], args: argparse.Namespace) -> dict:
    backend = OrtBackend(model, Settings(intra_op_threads=args.threads))
    meta = backend.metadata
    waves = [decode(c, meta.sample_rate, 600).waveform[: meta.clip_samples] for c in clips]
    batch = np.zeros((args.batch_size, meta.clip_samples), np.float32)  # (B, clip), pre-decoded
    for i, w in enumerate(waves[: args.batch_size]):
        batch[i, : len(w)] = w
    backend.predict(batch)  # warm-up
    times = []
    t0 = time.perf_counter()
    for _ in range(args.batches):
        t = time.perf_counter()
        backend.predict(batch)
        times.append(time.perf_counter() - t)
    wall = time.perf_counter() - t0
    backend.close()
    return {
        "clips_per_s": args.batches * args.batch_size / wall,
        **percentiles(times),
        "variant": meta.variant,
    }


# --- service end to end ------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_service(model: Path, port: int, args: argparse.Namespace) -> subprocess.Popen:
    env = {
        **os.environ, "ESC50_MODEL_PATH": str(model), "ESC50_HOST": "127.0.0.1",
        "ESC50_PORT": str(port), "ESC50_MAX_BATCH_SIZE": str(args.batch_size),
        "ESC50_MAX_WAIT_MS": str(args.max_wait_ms), "ESC50_INTRA_OP_THREADS": str(args.threads),
        "ESC50_MAX_QUEUE_SIZE": str(4 * args.concurrency), "ESC50_REQUEST_TIMEOUT_S": "600",
        "ESC50_LOG_LEVEL": "warning",
    }  # fmt: skip
    return subprocess.Popen([sys.executable, "-m", "service"], env=env, cwd=REPO_ROOT)


def wait_ready(base: str, proc: subprocess.Popen, timeout_s: float = 300) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"the service exited with {proc.returncode} before becoming ready")
        try:
            if httpx.get(f"{base}/readyz", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    raise SystemExit(f"the service was not ready after {timeout_s:.0f} s")


async def load(
    base: str, clips: list[bytes], n: int, concurrency: int
) -> tuple[list[float], float]:
    """n requests from `concurrency` clients; returns per-request latencies and wall time."""
    latencies: list[float] = []
    counter = iter(range(n))
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=base, timeout=600, limits=limits) as client:

        async def worker() -> None:
            for i in counter:
                t = time.perf_counter()
                body = clips[i % len(clips)]
                r = await client.post("/v1/classify", content=body, headers=OCTET)
                r.raise_for_status()
                latencies.append(time.perf_counter() - t)

        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        return latencies, time.perf_counter() - t0


def mean_batch(base: str) -> tuple[float, float]:
    text = httpx.get(f"{base}/metrics").text
    found = dict(re.findall(r"^(esc50_batch_size_(?:sum|count)) (\S+)$", text, re.M))
    return float(found["esc50_batch_size_sum"]), float(found["esc50_batch_size_count"])


def bench_service(model: Path, clips: list[bytes], args: argparse.Namespace) -> dict:
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    proc = start_service(model, port, args)
    try:
        wait_ready(base, proc)
        asyncio.run(load(base, clips, args.concurrency, args.concurrency))  # warm connections
        s0, c0 = mean_batch(base)
        latencies, wall = asyncio.run(load(base, clips, args.requests, args.concurrency))
        s1, c1 = mean_batch(base)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(60)
    return {
        "clips_per_s": args.requests / wall, **percentiles(latencies),
        "mean_batch": (s1 - s0) / max(c1 - c0, 1),
    }  # fmt: skip


# --- report ------------------------------------------------------------------------------------


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        found = re.search(r"model name\s*:\s*(.+)", Path("/proc/cpuinfo").read_text())
        cpu = found.group(1) if found else cpu
    return f"{cpu}, {os.cpu_count()} cores, onnxruntime {ort.__version__}"


def table(rows: list[dict]) -> str:
    cols = ["model", "variant", "mode", "batch", "clients", "clips/s", "p50 ms", "p95 ms", "p99 ms"]
    cols += ["mean batch", "vs raw"]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        lines.append(
            f"| {r['model']} | {r['variant']} | {r['mode']} | {r['batch']} "
            f"| {r.get('clients', '-')} | {r['clips_per_s']:.1f} | {r['p50_ms']:.0f} "
            f"| {r['p95_ms']:.0f} | {r['p99_ms']:.0f} | {r.get('mean_batch', r['batch']):.1f} "
            f"| {r.get('ratio', 1.0):.0%} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    args.concurrency = args.concurrency or 2 * args.batch_size
    args.requests = args.requests or args.batches * args.batch_size
    clips = load_clips(args.clips, max(args.batch_size, 32))
    if args.encode == "wav":
        clips = [as_wav(c) for c in clips]
    rows = []
    for model in args.models or default_models():
        raw = bench_raw(model, clips, args)
        svc = bench_service(model, clips, args)
        common = {"model": model.name, "variant": raw.pop("variant"), "batch": args.batch_size}
        rows.append({**common, "mode": "raw ORT (pre-decoded)", **raw})
        ratio = svc["clips_per_s"] / raw["clips_per_s"]
        rows.append(
            {**common, "mode": "service (HTTP)", "clients": args.concurrency, **svc, "ratio": ratio}
        )
    decode_ms = decode_ms_per_clip(clips)
    print(f"Machine: {machine()}\n")
    print(table(rows))
    print(f"\nClips sent as {args.encode}; decode + resample, which only the service pays: "
          f"{decode_ms:.1f} ms/clip")
    if args.json:
        doc = {"machine": machine(), "args": vars(args), "rows": rows, "decode_ms": decode_ms}
        args.json.write_text(json.dumps(doc, indent=2, default=str))


if __name__ == "__main__":
    main()
