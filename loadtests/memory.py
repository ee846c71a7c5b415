"""The service's memory, measured on a real process (make memory; docs/memory.md explains it).

    python -m loadtests.memory                    # < 1 min on 2 cores -> reports/memory.{md,json}
    python -m loadtests.memory --load-s 10 --bombs 2

Starts `python -m service` (the shipped model, default settings) on a free loopback port and
reads its VmRSS and VmHWM (peak RSS) from /proc/<pid>/status in four phases:
  1. idle after warm-up (and a few sequential requests);
  2. normal load: --concurrency clients posting real ESC-50 clips for --load-s seconds;
  3. decode bombs: --bombs concurrent copies each of the issue's FLAC (8 channels at 384 kHz for
     110 s, 360 KB: 413 from its header), one within the decode budget (8 channels at 48 kHz
     for 110 s: decoded, 200) and one of unknown length (413 while decoding);
  4. long uploads: --bombs concurrent honest 110 s mono WAVs (what a legitimate request can
     hold: its body, its output, its windows, their batches);
then checks the service still classifies a clip. Beside the figures, the report writes the
worst case computed from the settings (docs/memory.md derives it).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import soundfile as sf

from contract.audio import CLIP_SAMPLES, DECODE_BLOCK_SAMPLES, SAMPLE_RATE
from contract.machine import cpu_model
from loadtests.local import clean_env, exited, free_port, wait_ready
from service.settings import Settings

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
AUDIO_DIR = REPO.parent / "shared" / "esc50" / "audio"  # real clips when present
MiB = 1 << 20
SHIPPED_INT8 = REPO / "models" / "esc50-resnet34.int8.onnx"


# --- inputs ------------------------------------------------------------------------------------


def flac_silence(seconds: int, rate: int, channels: int) -> bytes:
    buf = io.BytesIO()
    second = np.zeros((rate, channels), np.int16)
    with sf.SoundFile(buf, "w", rate, channels, format="FLAC", subtype="PCM_16") as f:
        for _ in range(seconds):
            f.write(second)
    return buf.getvalue()


def unknown_length(flac: bytes) -> bytes:
    """STREAMINFO's 36-bit total-samples field set to 0 ("unknown", as streaming encoders do)."""
    b = bytearray(flac)
    fields = int.from_bytes(b[18:26], "big") & ~((1 << 36) - 1)
    b[18:26] = fields.to_bytes(8, "big")
    return bytes(b)


def tone_wav(seconds: float) -> bytes:
    t = np.arange(int(seconds * SAMPLE_RATE)) / SAMPLE_RATE
    buf = io.BytesIO()
    sf.write(
        buf,
        (0.3 * np.sin(2 * np.pi * 440 * t)).astype(np.float32),
        SAMPLE_RATE,
        "PCM_16",
        format="WAV",
    )
    return buf.getvalue()


def real_clips(n: int = 64) -> list[tuple[bytes, str]]:
    files = sorted(AUDIO_DIR.glob("*.*"))[:n] or sorted((HERE / "clips").glob("*.*"))
    types = {".wav": "audio/wav", ".flac": "audio/flac", ".ogg": "audio/ogg"}
    return [(p.read_bytes(), types.get(p.suffix, "application/octet-stream")) for p in files]


# --- the process -------------------------------------------------------------------------------


def vm(pid: int) -> dict[str, float]:
    """VmRSS and VmHWM in MiB."""
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            out[key] = int(value.split()[0]) / 1024
    return out


class Sampler:
    """Max VmRSS seen, sampled every 0.2 s in a thread (VmHWM gives the exact peak)."""

    def __init__(self, pid: int) -> None:
        self.pid, self.max_rss, self._stop = pid, 0.0, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(0.2):
            self.max_rss = max(self.max_rss, vm(self.pid)["VmRSS"])

    def __enter__(self) -> Sampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


# --- phases ------------------------------------------------------------------------------------


def post(client: httpx.Client, body: bytes, content_type: str) -> int:
    r = client.post("/v1/classify", content=body, headers={"content-type": content_type})
    return r.status_code


def load(base: str, clips: list[tuple[bytes, str]], concurrency: int, seconds: float) -> dict:
    statuses: dict[int, int] = {}
    lock = threading.Lock()
    until = time.monotonic() + seconds

    def client(i: int) -> None:
        with httpx.Client(base_url=base, timeout=60) as c:
            k = i
            while time.monotonic() < until:
                status = post(c, *clips[k % len(clips)])
                k += concurrency
                with lock:
                    statuses[status] = statuses.get(status, 0) + 1

    with ThreadPoolExecutor(concurrency) as pool:
        list(pool.map(client, range(concurrency)))
    return {"requests": sum(statuses.values()), "statuses": statuses}


def at_once(base: str, bodies: list[tuple[str, bytes, str]]) -> dict[str, int]:
    def one(item: tuple[str, bytes, str]) -> tuple[str, int]:
        with httpx.Client(base_url=base, timeout=120) as c:
            return item[0], post(c, item[1], item[2])

    with ThreadPoolExecutor(len(bodies)) as pool:
        return dict(pool.map(one, bodies))


def versions(base: str, policy: str) -> dict:
    """Load the repository's model under `policy` (the control API), wait for the versions it
    drops to unload, and say what each loaded version added when it loaded."""
    config = json.dumps({"version_policy": policy})
    with httpx.Client(base_url=base, timeout=300) as c:
        r = c.post(
            "/v2/repository/models/esc50-resnet34/load", json={"parameters": {"config": config}}
        )
        r.raise_for_status()
        for _ in range(600):
            listing = c.get("/v1/models").json()
            if not listing["unavailable"]:
                break
            time.sleep(0.1)
    return {f"v{m['version']} MiB": round(m["memory_bytes"] / 2**20, 1) for m in listing["models"]}


def phase(pid: int, name: str, run) -> dict:
    before = vm(pid)
    t0 = time.monotonic()
    with Sampler(pid) as sampler:
        result = run()
    after = vm(pid)
    row = {
        "phase": name,
        "seconds": round(time.monotonic() - t0, 1),
        "rss_before_mib": round(before["VmRSS"], 1),
        "rss_max_mib": round(max(sampler.max_rss, after["VmRSS"]), 1),
        "rss_after_mib": round(after["VmRSS"], 1),
        "hwm_after_mib": round(after["VmHWM"], 1),
        "result": result,
    }
    print(json.dumps(row), flush=True)
    return row


# --- the worst case from the settings -----------------------------------------------------------


def worst_case(s: Settings) -> dict:
    """Bytes a request and the service can hold for audio, from the settings (docs/memory.md)."""
    output = s.max_duration_s * SAMPLE_RATE * 4  # the model-rate mono waveform, float32
    hop = round(s.window_hop_s * SAMPLE_RATE)
    windows = int(max(0, s.max_duration_s * SAMPLE_RATE - CLIP_SAMPLES) // hop) + 2
    windows_b = windows * CLIP_SAMPLES * 4
    request = s.max_body_bytes + output + windows_b
    decode_extra = DECODE_BLOCK_SAMPLES * 4 * 2  # the block and its downmix, per decode worker
    return {
        "body_mib": s.max_body_bytes / MiB,
        "output_mib": output / MiB,
        "windows_per_request": windows,
        "windows_mib": windows_b / MiB,
        "per_request_mib": request / MiB,
        "decode_blocks_mib": s.decode_workers * decode_extra / MiB,
        "queue_mib": s.max_queue_size * request / MiB,
        "explain_mib": (s.explain_concurrency + s.explain_max_queue)
        * (s.max_body_bytes + s.explain_max_duration_s * SAMPLE_RATE * 4 * 3)
        / MiB,
    }


# --- main ----------------------------------------------------------------------------------------


def measured_settings(args: argparse.Namespace) -> Settings:
    """The settings the measured service ran with: defaults (it got a clean environment) but
    for the queue-wait limit."""
    saved = {k: os.environ.pop(k) for k in list(os.environ) if k.startswith("ESC50_")}
    try:
        return Settings(max_queue_wait_s=args.max_queue_wait_s)
    finally:
        os.environ.update(saved)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--concurrency", type=int, default=4, help="clients in the normal load")
    p.add_argument("--load-s", type=float, default=20.0, help="seconds of normal load")
    p.add_argument("--bombs", type=int, default=4, help="concurrent copies of each bomb")
    # Expected-wait admission (ESC50_MAX_QUEUE_WAIT_S, 0.5 s) would refuse part of each burst
    # with 503 before reading it; a long limit admits every upload: the worst case for memory.
    p.add_argument("--max-queue-wait-s", type=float, default=60.0)
    p.add_argument("--out", type=Path, default=HERE / "reports" / "memory")
    return p.parse_args(argv)


def measure(args: argparse.Namespace) -> dict:
    port = free_port()
    # the shipped model as versions 1 and 2 of a repository (same bytes): version 2 loads and
    # unloads at the end, to measure what one more loaded version costs and what comes back
    repo = Path(tempfile.mkdtemp(prefix="esc50-memory-repo-"))
    for v in (1, 2):
        (repo / "esc50-resnet34" / str(v)).mkdir(parents=True)
        (repo / "esc50-resnet34" / str(v) / "model.onnx").symlink_to(SHIPPED_INT8)
    env = clean_env(
        ESC50_HOST="127.0.0.1",
        ESC50_PORT=str(port),
        ESC50_LOG_LEVEL="warning",
        ESC50_MAX_QUEUE_WAIT_S=str(args.max_queue_wait_s),
        ESC50_MODEL_REPOSITORY=str(repo),
        ESC50_VERSION_POLICY="specific:1",
        ESC50_CONTROL_OPEN="1",
    )
    log = Path(tempfile.gettempdir()) / f"esc50-memory-{port}.log"  # the service's output
    with log.open("w") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "service"], cwd=REPO, env=env, stdout=out, stderr=out
        )
    base = f"http://127.0.0.1:{port}"
    try:
        wait_ready(base, exited(proc), 300, lambda: log.read_text()[-2000:])
        clips = real_clips()
        with httpx.Client(base_url=base, timeout=60) as c:
            card = c.get("/v1/models").json()["models"][0]
            for body, ctype in clips[:8]:  # first requests: lazy allocations done
                post(c, body, ctype)
        pid, n = proc.pid, args.bombs
        issue, within = flac_silence(110, 384_000, 8), flac_silence(110, 48_000, 8)
        unknown = unknown_length(flac_silence(20, 384_000, 8))
        long_wav = tone_wav(110.0)
        phases = [
            phase(pid, "idle after warm-up", lambda: {}),
            phase(
                pid,
                f"normal load: {args.concurrency} clients, real clips, {args.load_s:g} s",
                lambda: load(base, clips, args.concurrency, args.load_s),
            ),
            phase(
                pid,
                f"decode bombs at once: {n} x issue FLAC, {n} x 8ch/48k/110 s, "
                f"{n} x unknown length",
                lambda: at_once(
                    base,
                    [(f"issue{i}", issue, "audio/flac") for i in range(n)]
                    + [(f"8ch48k{i}", within, "audio/flac") for i in range(n)]
                    + [(f"unknown{i}", unknown, "audio/flac") for i in range(n)],
                ),
            ),
            phase(
                pid,
                f"{n} honest 110 s mono WAV uploads at once",
                lambda: at_once(base, [(f"wav{i}", long_wav, "audio/wav") for i in range(n)]),
            ),
            phase(pid, "version 2 loaded beside version 1", lambda: versions(base, "all")),
            phase(pid, "version 2 unloaded", lambda: versions(base, "specific:1")),
        ]
        with httpx.Client(base_url=base, timeout=60) as c:
            after = post(c, *clips[0])
    finally:
        proc.terminate()
        proc.wait(60)
    sizes = {"issue_flac_bytes": len(issue), "within_budget_flac_bytes": len(within)}
    model = {k: card.get(k) for k in ("name", "version", "variant", "backend", "provider")}
    return {"phases": phases, "classify_after_bombs": after, "inputs": sizes, "model": model}


def markdown(r: dict) -> str:
    w, s = r["worst_case"], r["settings"]
    lines = [
        "# Service memory (RSS) under load and decode bombs",
        "",
        f"Command: `{r['command']}`  ",
        f"Machine: {r['cpu']} ({r['cpus']} CPUs), Python {r['python']}  ",
        f"Model: {r['model']['name']} {r['model']['version']} ({r['model']['variant']}, "
        f"{r['model']['backend']}/{r['model']['provider']}), default settings but "
        f"ESC50_MAX_QUEUE_WAIT_S={r['settings']['max_queue_wait_s']:g} (every upload admitted)  ",
        f"Issue bomb: {r['inputs']['issue_flac_bytes']:,} bytes of FLAC (8 ch x 384 kHz x 110 s);"
        f" within-budget bomb: {r['inputs']['within_budget_flac_bytes']:,} bytes",
        "",
        "| phase | s | RSS before MiB | RSS max MiB | RSS after MiB | peak (VmHWM) MiB | answers |",
        "|---|---|---|---|---|---|---|",
    ]
    for p in r["phases"]:
        res = p["result"]
        if "statuses" in res:
            answers = f"{res['requests']} requests: {res['statuses']}"
        elif any(k.endswith("MiB") for k in res):  # what each loaded version added at load
            answers = "loaded: " + ", ".join(f"{k.split()[0]} +{v} MiB" for k, v in res.items())
        else:
            counts: dict[str, int] = {}
            for name, status in res.items():
                key = f"{name.rstrip('0123456789')} {status}"
                counts[key] = counts.get(key, 0) + 1
            answers = ", ".join(f"{v} x {k}" for k, v in counts.items()) or "-"
        lines.append(
            f"| {p['phase']} | {p['seconds']} | {p['rss_before_mib']} | {p['rss_max_mib']} | "
            f"{p['rss_after_mib']} | {p['hwm_after_mib']} | {answers} |"
        )
    lines += [
        "",
        f"Classify after the bombs: HTTP {r['classify_after_bombs']}.",
        "",
        "## Worst case from the settings (docs/memory.md)",
        "",
        f"Settings: max_body_bytes {s['max_body_bytes']:,}, max_duration_s {s['max_duration_s']:g},"
        f" window_hop_s {s['window_hop_s']:g}, max_queue_size {s['max_queue_size']}, "
        f"decode_workers {s['decode_workers']}, explain {s['explain_concurrency']}+"
        f"{s['explain_max_queue']} x {s['explain_max_duration_s']:g} s.",
        "",
        "| item | MiB |",
        "|---|---|",
        f"| one request: body {w['body_mib']:.0f} + output {w['output_mib']:.1f} + "
        f"{w['windows_per_request']} windows {w['windows_mib']:.1f} | {w['per_request_mib']:.1f} |",
        f"| decode blocks ({s['decode_workers']} workers) | {w['decode_blocks_mib']:.1f} |",
        f"| every queue place holding the largest request ({s['max_queue_size']}) | "
        f"{w['queue_mib']:.0f} |",
        f"| explain places | {w['explain_mib']:.0f} |",
    ]
    return "\n".join(lines) + "\n"


def rewrite(json_path: Path) -> None:
    """Re-render the markdown from a saved JSON report."""
    json_path.with_suffix(".md").write_text(markdown(json.loads(json_path.read_text())))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    r = measure(args)
    s = measured_settings(args)
    r |= {
        "command": "python -m loadtests.memory "
        + " ".join(argv if argv is not None else sys.argv[1:]),
        "cpu": cpu_model(),
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "settings": s.model_dump(mode="json", exclude={"api_token"}),
        "worst_case": worst_case(s),
    }
    args.out.with_suffix(".json").write_text(json.dumps(r, indent=1) + "\n")
    args.out.with_suffix(".md").write_text(markdown(r))
    print(markdown(r))
    return 0 if r["classify_after_bombs"] == 200 else 1


if __name__ == "__main__":
    sys.exit(main())
