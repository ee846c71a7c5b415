"""`python -m loadtests.tracing_overhead`: what tracing costs the service.

The same int8 service (`python -m service`, JSON access lines on) runs as up to three servers
at once, loaded one at a time, round after round in turn (a shared machine's noise hits all
alike), with loadtests/load.py's closed loop at one concurrency on 16-bit WAV clips:

  - off:      tracing off (no OTEL_* variable), the way the service runs by default;
  - on:       every request traced (the SDK's default sampler) and exported over OTLP/HTTP to a
              receiver in this process that reads and acknowledges each export (a collector's
              network side, without its processing);
  - baseline: the service at `--baseline-ref` (a commit before the observability work, taken
              with `git archive`, nothing in the working tree changes), when given: tracing off
              against code without its hooks.

Also the hooks' own cost while tracing is off, in nanoseconds per call (timeit). Writes
OUT.md + OUT.json (default build/tracing-overhead; the committed report is
loadtests/reports/tracing-overhead.md) with the CPU model and the command.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import shlex
import subprocess
import sys
import tempfile
import threading
import timeit
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from statistics import median

from loadtests import bench
from loadtests.local import NotReady, clean_env, exited, free_port, wait_ready

REPO = bench.REPO
DEFAULT_OUT = REPO / "build" / "tracing-overhead"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m loadtests.tracing_overhead", description=__doc__)
    p.add_argument("--model", type=Path, default=REPO / "models" / "esc50-resnet34.int8.onnx")
    p.add_argument("--clips", type=Path, default=bench.DEFAULT_CLIPS, help="real clips to send")
    p.add_argument("--max-clips", type=int, default=64, help="distinct clips cycled through")
    p.add_argument("--concurrency", type=int, default=16, help="closed-loop clients")
    p.add_argument("--duration", type=float, default=15.0, help="measured s per round")
    p.add_argument("--warmup", type=float, default=3.0, help="unmeasured s per round")
    p.add_argument("--rounds", type=int, default=2, help="rounds; each loads every server once")
    p.add_argument("--baseline-ref", default="", help="git commit for the baseline server")
    p.add_argument("--note", default="", help="a line for the report (e.g. 'shared machine')")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help="writes OUT.md + OUT.json")
    args = p.parse_args(argv)
    args.argv = sys.argv[1:] if argv is None else argv
    return args


@contextlib.contextmanager
def otlp_receiver() -> Iterator[tuple[str, dict]]:
    """OTLP/HTTP on loopback: reads each export, answers 200 (an empty response message)."""
    seen = {"exports": 0, "bytes": 0}

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802 (http.server's name)
            seen["bytes"] += len(self.rfile.read(int(self.headers["Content-Length"])))
            seen["exports"] += 1
            self.send_response(200)
            self.send_header("Content-Type", "application/x-protobuf")
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", seen
    finally:
        server.shutdown()
        server.server_close()


@contextlib.contextmanager
def service(cwd: Path, model: Path, log: Path, **env: str) -> Iterator[str]:
    port = free_port()
    settings = {
        "ESC50_MODEL_PATH": str(model),
        "ESC50_PORT": str(port),
        "ESC50_LOG_FORMAT": "json",  # the containers' choice: an access line per request
        "ESC50_LOG_LEVEL": "info",
    }
    base = f"http://127.0.0.1:{port}"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "service"],
            cwd=cwd,
            env=clean_env(**settings, **env),
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        try:
            wait_ready(base, exited(proc), 300, lambda: log.read_text()[-2000:])
        except NotReady as e:
            raise SystemExit(str(e)) from None
        yield base
    finally:
        proc.terminate()
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()


def baseline_tree(ref: str, folder: Path) -> Path:
    """The service and contract packages at `ref`, unpacked into `folder` (git state unchanged)."""
    archive = subprocess.run(
        ["git", "archive", ref, "service", "contract"], cwd=REPO, capture_output=True, check=True
    )
    subprocess.run(["tar", "-x", "-C", str(folder)], input=archive.stdout, check=True)
    return folder


def hook_costs_off() -> dict[str, float]:
    """Nanoseconds per call of each tracing hook while tracing is off."""
    from service.observability import tracing

    assert not tracing.enabled()

    def span() -> None:
        with tracing.span("decode"):
            pass

    calls = {
        "span (with block)": span,
        "job_trace": lambda: tracing.job_trace("onnxruntime"),
        "record_batch": lambda: tracing.record_batch((), 16, 0.1),
        "exemplar": tracing.exemplar,
        "start_request": lambda: tracing.start_request({}, "id"),
    }
    n = 200_000
    return {name: min(timeit.repeat(f, number=n, repeat=3)) / n * 1e9 for name, f in calls.items()}


def run(args: argparse.Namespace) -> dict:
    tmp = Path(tempfile.mkdtemp(prefix="esc50-tracing."))
    wavs = bench.write_wavs(bench.clip_files(args.clips, args.max_clips), tmp / "wav")
    load_args = argparse.Namespace(
        client_cpu_list=None, max_clips=args.max_clips, duration=args.duration, warmup=args.warmup
    )
    rows: dict[str, list[dict]] = {}
    with contextlib.ExitStack() as stack:
        endpoint, seen = stack.enter_context(otlp_receiver())
        model = args.model.resolve()
        servers = {
            "off": stack.enter_context(service(REPO, model, tmp / "off.log")),
            "on": stack.enter_context(
                service(
                    REPO,
                    model,
                    tmp / "on.log",
                    OTEL_EXPORTER_OTLP_ENDPOINT=endpoint,
                    OTEL_EXPORTER_OTLP_PROTOCOL="http/protobuf",
                )
            ),
        }
        if args.baseline_ref:
            tree = baseline_tree(args.baseline_ref, Path(tempfile.mkdtemp(dir=tmp)))
            servers["baseline"] = stack.enter_context(service(tree, model, tmp / "baseline.log"))
        for r in range(args.rounds):
            for name, base in servers.items():
                print(f"round {r + 1}/{args.rounds}: {name}")
                row = bench.load(f"{base}/v1/classify", "raw", wavs, args.concurrency, load_args)
                rows.setdefault(name, []).append(row)
    exports = dict(seen)  # after the servers stopped: their last spans flushed on the way out
    return {
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "command": "python -m loadtests.tracing_overhead " + shlex.join(args.argv),
        "machine": bench.machine(),
        "note": args.note,
        "settings": {k: str(v) for k, v in vars(args).items() if k != "argv"},
        "rows": rows,
        "exports": exports,
        "hooks_off_ns": hook_costs_off(),
    }


def summary(rows: list[dict]) -> dict[str, float]:
    return {
        "rps": median(r["rps"] for r in rows),
        "p50": median(r["p50_ms"] for r in rows),
        "p99": median(r["p99_ms"] for r in rows),
    }


def markdown(r: dict) -> str:
    m, s = r["machine"], r["settings"]
    lines = [
        "# Tracing overhead",
        "",
        f"- Command: `{r['command']}` ({r['date']})",
        f"- CPU: {m['cpu']}, {m['cpus']} CPUs; Python {m['python']}, ONNX Runtime "
        f"{m['onnxruntime']}",
        f"- Load: loadtests/load.py, {s['concurrency']} closed-loop clients, 16-bit WAV clips, "
        f"{s['rounds']} rounds of {s['warmup']} s warm-up + {s['duration']} s measured per "
        "server, servers loaded in turn; client and servers share the machine's CPUs (no "
        "pinning).",
        *([f"- Note: {r['note']}"] if r["note"] else []),
        "",
        "| server | req/s (median of rounds) | p50 ms | p99 ms | req/s per round | refused |",
        "| --- | ---: | ---: | ---: | --- | --- |",
    ]
    for name, rows in r["rows"].items():
        s_ = summary(rows)
        each = ", ".join(f"{row['rps']:.1f}" for row in rows)
        refused = ", ".join(str(sum(row.get("failed", {}).values())) for row in rows)
        lines.append(
            f"| {name} | {s_['rps']:.1f} | {s_['p50']:.1f} | {s_['p99']:.1f} | {each} | {refused} |"
        )
    off = summary(r["rows"]["off"])
    on = summary(r["rows"]["on"])
    lines += [
        "",
        f"Tracing on (every request traced, 6 spans per request plus one per batch, exported "
        f"over OTLP/HTTP: {r['exports']['exports']} exports, {r['exports']['bytes']} bytes): "
        f"{100 * (on['rps'] / off['rps'] - 1):+.1f} % req/s, "
        f"{100 * (on['p50'] / off['p50'] - 1):+.1f} % p50 against tracing off.",
    ]
    if "baseline" in r["rows"]:
        base = summary(r["rows"]["baseline"])
        lines.append(
            f"Tracing off against the baseline ({s['baseline_ref']}, no hooks): "
            f"{100 * (off['rps'] / base['rps'] - 1):+.1f} % req/s, "
            f"{100 * (off['p50'] / base['p50'] - 1):+.1f} % p50. The spread between rounds of "
            "one server is the noise to compare it with."
        )
    lines += [
        "",
        "Refused: answers other than 200 per round (the service's 503s when its expected queue "
        "wait passes ESC50_MAX_QUEUE_WAIT_S); a busy machine refuses more.",
    ]
    lines += ["", "Hooks while tracing is off (ns per call, best of 3 x 200,000):", ""]
    lines += [f"- `{k}`: {v:.0f} ns" for k, v in r["hooks_off_ns"].items()]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    result = run(args)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    args.out.with_suffix(".md").write_text(markdown(result))
    print(markdown(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
