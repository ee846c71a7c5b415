"""`python -m loadtests.overload` (= `make overload`): what overload costs, through the load
balancer and on the bare service, measured with `wrk` (C: it costs the server's cores almost
nothing, where a Python generator saturates a core of its own) and loadtests/overload.lua
rotating real clips (ESC-50, re-encoded as the 16-bit WAV the dataset ships; the bundled
loadtests/clips when ../shared/esc50 is absent).

  1. through the LB: `loadtests.serve_lb` (docker/haproxy/haproxy.cfg, Debian's haproxy) in front
     of one replica (on 2 cores one replica is the honest setup; the LB is C): goodput at the
     saturating connection count (--connections, 32: where the service peaks in
     loadtests/reports/bench.md), then goodput and the accepted requests' p99 (from HAProxy's
     log) at --factor times that;
  2. the bare service, the same two runs: every request past its queue is refused in Python;
  3. the CPU one refusal costs the bare service: the only queue place (ESC50_MAX_QUEUE_SIZE=1)
     held by a stalled upload, wrk's clips all answered 503; the server process's CPU seconds
     (/proc/<pid>/stat) over the refusals.

Writes build/overload.{md,json} (`--out`; `make overload RELEASE=1`: the committed
loadtests/reports/overload.{md,json}) with the machine and the command.
Target (issue 15): goodput at 10x through the LB >= 0.9 of the peak, accepted p99 within the
queue timeout plus the replica's own p99. Exit code 1 when a target is missed.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from contract.machine import cpu_model
from loadtests.bench import BUNDLED_CLIPS, DEFAULT_CLIPS, clip_files, write_wavs
from loadtests.local import clean_env, scrape_metrics
from loadtests.serve_lb import (
    HAPROXY_CFG,
    STARTUP_S,
    free_port_block,
    local_lb,
    reap,
    spawn,
    wait_all_ready,
)

REPO = Path(__file__).resolve().parent.parent
LUA = Path(__file__).resolve().parent / "overload.lua"
DEFAULT_OUT = REPO / "build" / "overload"  # git-ignored; the committed report: RELEASE=1
TARGET_GOODPUT = 0.9  # goodput at --factor x saturation over the peak, through the LB
# One HAProxy httplog line: ... api api/<server> TR/Tw/Tc/Tr/Ta status bytes ... "METHOD ...
HTTPLOG = re.compile(
    r" api api/(?P<server>\S+) -?\d+/-?\d+/-?\d+/-?\d+/\+?(?P<ta>-?\d+) (?P<status>\d{3}) "
    r'\d+ \S+ \S+ (?P<flags>\S{4}) .*"POST '
)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m loadtests.overload", description=__doc__)
    p.add_argument("--clips", type=Path, default=DEFAULT_CLIPS, help="audio clips to send")
    p.add_argument("--max-clips", type=int, default=40, help="clips wrk rotates through")
    p.add_argument("--connections", type=int, default=32, help="the saturating count")
    p.add_argument("--factor", type=int, default=10, help="overload = factor x connections")
    p.add_argument("--duration", type=int, default=20, help="seconds per measured run")
    p.add_argument("--warmup", type=int, default=5, help="seconds of load before measuring")
    p.add_argument("--refusal-duration", type=int, default=10, help="seconds of refusals")
    p.add_argument("--threads", type=int, default=2, help="wrk threads")
    p.add_argument("--maxconn", type=int, help="per-replica maxconn (default: the cfg's)")
    p.add_argument("--skip", default="", help="comma-separated: lb,bare,refusal")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help="writes OUT.md + OUT.json")
    return p.parse_args(argv)


def clip_list(folder: Path, n: int, work: Path) -> tuple[Path, str]:
    """The clips as 16-bit WAV files, listed one per line for overload.lua; and their source."""
    source = folder if folder.is_dir() else BUNDLED_CLIPS
    wavs = write_wavs(clip_files(source, n), work / "wav")
    listing = work / "clips.txt"
    listing.write_text("".join(f"{p}\n" for p in sorted(wavs.glob("*.wav"))))
    return listing, str(source)


# --- processes ---------------------------------------------------------------------------------


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process so far (/proc/<pid>/stat, fields 14 and 15)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@contextlib.contextmanager
def bare_service(
    port: int, logs: Path, env: dict[str, str] | None = None
) -> Iterator[subprocess.Popen]:
    full_env = clean_env(
        ESC50_HOST="127.0.0.1", ESC50_PORT=str(port), ESC50_LOG_LEVEL="warning", **(env or {})
    )
    proc = spawn([sys.executable, "-m", "service"], logs / f"bare-{port}.log", full_env)
    try:
        wait_all_ready(f"http://127.0.0.1:{port}/readyz", [proc], STARTUP_S, logs)
        yield proc
    finally:
        if proc.poll() is None:
            proc.terminate()
        reap(proc, 45)


def rejected_by_service(base: str) -> float:
    """The service's own refusals so far (esc50_requests_rejected_total, every reason)."""
    metrics = scrape_metrics(base)
    return sum(v for k, v in metrics.items() if k.startswith("esc50_requests_rejected_total{"))


def wrk(url: str, connections: int, seconds: int, clips: Path, threads: int) -> dict:
    """One wrk run with overload.lua; its OVERLOAD_JSON line, parsed."""
    cmd = [
        "wrk",
        f"-t{min(threads, connections)}",
        f"-c{connections}",
        f"-d{seconds}s",
        "--timeout",
        "30s",  # past HAProxy's queue timeout: a queued request is an answer, not a wrk error
        "-s",
        str(LUA),
        url,
        "--",
        str(clips),
    ]
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    found = re.search(r"^OVERLOAD_JSON (.+)$", done.stdout, re.M)
    if done.returncode or not found:
        raise RuntimeError(f"wrk failed ({done.returncode}): {done.stdout[-1500:]}{done.stderr}")
    return json.loads(found.group(1))


# --- the runs ----------------------------------------------------------------------------------


def measured_run(
    url: str, c: int, args: argparse.Namespace, clips: Path, pids: dict[str, int], replica: str
) -> dict:
    """wrk at `c` connections with the CPU each process used and the service's refusals."""
    rejected0 = rejected_by_service(replica)
    cpu0 = {name: cpu_seconds(pid) for name, pid in pids.items()}
    t0 = time.perf_counter()
    w = wrk(url, c, args.duration, clips, args.threads)
    wall = time.perf_counter() - t0
    ok = w["statuses"].get("200", 0)
    refused = w["statuses"].get("503", 0)
    return {
        "connections": c,
        "duration_s": w["duration_s"],
        "answers": w["requests"],
        "statuses": w["statuses"],
        "socket_errors": w["errors"],
        "goodput_rps": ok / w["duration_s"],
        "refused_rps": refused / w["duration_s"],
        "refused_by_service": rejected_by_service(replica) - rejected0,
        "all_answers_latency_ms": w["latency_ms"],
        "cores": {name: (cpu_seconds(pid) - cpu0[name]) / wall for name, pid in pids.items()},
    }


def lb_log_view(log: Path, offset: int) -> dict:
    """From HAProxy's log past `offset`: accepted latencies and who refused."""
    accepted: list[int] = []
    refused_by_lb = refused_by_replica = 0
    with log.open("rb") as f:
        f.seek(offset)
        for line in f.read().decode(errors="replace").splitlines():
            m = HTTPLOG.search(line)
            if not m:
                continue
            if m["status"] == "200":
                accepted.append(int(m["ta"]))
            elif m["status"] == "503":
                # termination flags "----": the replica's own answer; "sQ--" (queue timeout)
                # or any other: HAProxy answered
                if m["flags"].startswith("-"):
                    refused_by_replica += 1
                else:
                    refused_by_lb += 1
    accepted.sort()

    def pct(q: float) -> float | None:
        return float(accepted[min(len(accepted) - 1, int(q * len(accepted)))]) if accepted else None

    return {
        "accepted_latency_ms": {"p50": pct(0.50), "p99": pct(0.99), "max": pct(1.0)},
        "refused_by_lb": refused_by_lb,
        "refused_by_replica": refused_by_replica,
    }


def run_pair(url: str, args, clips: Path, pids: dict[str, int], replica: str, log=None) -> dict:
    print(f"  warm-up {args.warmup} s at {args.connections} connections", flush=True)
    wrk(url, args.connections, args.warmup, clips, args.threads)
    out = {}
    for name, c in (("peak", args.connections), ("overload", args.factor * args.connections)):
        offset = log.stat().st_size if log else 0
        row = measured_run(url, c, args, clips, pids, replica)
        if log:
            row.update(lb_log_view(log, offset))
        print(f"  {name} c={c}: {row['goodput_rps']:.1f} req/s, {row['statuses']}", flush=True)
        out[name] = row
    out["goodput_ratio"] = out["overload"]["goodput_rps"] / max(out["peak"]["goodput_rps"], 1e-9)
    return out


def through_lb(args, clips: Path, logs: Path) -> dict:
    port = free_port_block(3)
    env = clean_env(ESC50_LOG_LEVEL="warning")  # the defaults, whatever the shell exports
    with local_lb(1, port, env=env, maxconn=args.maxconn, log_dir=logs / "lb") as lb:
        pids = {"service": lb.services[0].pid, "haproxy": lb.haproxy.pid}
        return run_pair(lb.url, args, clips, pids, lb.replicas[0], lb.log_dir / "haproxy.log")


def bare(args, clips: Path, logs: Path) -> dict:
    port = free_port_block(1)
    with bare_service(port, logs) as proc:
        base = f"http://127.0.0.1:{port}"
        return run_pair(base, args, clips, {"service": proc.pid}, base)


def refusal_cost(args, clips: Path, logs: Path) -> dict:
    """CPU seconds of the bare service per refused request (every request refused)."""
    port = free_port_block(1)
    # An upload that never finishes holds the one place: it was admitted before its body.
    with (
        bare_service(port, logs, {"ESC50_MAX_QUEUE_SIZE": "1"}) as proc,
        socket.create_connection(("127.0.0.1", port)) as hold,
    ):
        hold.sendall(
            b"POST /v1/classify HTTP/1.1\r\nHost: esc50\r\nContent-Type: audio/wav\r\n"
            b"Content-Length: 441044\r\n\r\nRIFF"
        )
        time.sleep(1)
        cpu0, t0 = cpu_seconds(proc.pid), time.perf_counter()
        w = wrk(f"http://127.0.0.1:{port}", args.connections, args.refusal_duration, clips, 1)
        cpu, wall = cpu_seconds(proc.pid) - cpu0, time.perf_counter() - t0
    refused = w["statuses"].get("503", 0)
    return {
        "connections": args.connections,
        "statuses": w["statuses"],
        "socket_errors": w["errors"],
        "refusals_per_s": refused / w["duration_s"],
        "server_cpu_s": cpu,
        "cpu_ms_per_refusal": 1000 * cpu / max(refused, 1),
        "server_cores": cpu / wall,
    }


def cfg_value(key: str) -> str:
    """A setting as haproxy.cfg states it (for the report)."""
    text = HAPROXY_CFG.read_text()
    found = re.search(rf"^\s*{re.escape(key)}\s+(.+?)\s*(#.*)?$", text, re.M)
    return found.group(1) if found else "?"


def cfg_default(variable: str) -> str:
    """The default haproxy.cfg gives a setting ("${VARIABLE-default}"); overload.py runs it."""
    found = re.search(rf'"\$\{{{variable}-([^}}]+)\}}"', HAPROXY_CFG.read_text())
    if not found:
        raise SystemExit(f"no ${{{variable}-...}} in {HAPROXY_CFG}")
    return found.group(1)


def run(args: argparse.Namespace) -> dict:
    for tool in ("wrk", "haproxy"):
        if not shutil.which(tool):
            raise SystemExit(f"{tool} is not installed (Debian: apt-get install wrk haproxy)")
    skip = set(filter(None, args.skip.split(",")))
    work = Path(tempfile.mkdtemp(prefix="esc50-overload."))
    clips, source = clip_list(args.clips, args.max_clips, work)
    report: dict = {
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "command": shlex.join(
            [Path(sys.executable).name, "-m", "loadtests.overload", *sys.argv[1:]]
        ),
        "machine": {"cpu": cpu_model(), "cpus": os.cpu_count()},
        "haproxy": subprocess.run(["haproxy", "-v"], capture_output=True, text=True).stdout.split(
            "\n"
        )[0],
        "wrk": f"wrk -t{args.threads} -c<connections> -d<seconds>s --timeout 30s "
        f"-s loadtests/overload.lua <url> -- <clip list>",
        "clips": {"source": source, "count": len(clips.read_text().split())},
        "settings": {
            "maxconn_per_replica": args.maxconn or cfg_default("ESC50_LB_REPLICA_MAXCONN"),
            "timeout_queue": cfg_default("ESC50_LB_TIMEOUT_QUEUE"),
            "retry_on": cfg_value("retry-on"),
            "duration_s": args.duration,
            "warmup_s": args.warmup,
        },
        "logs": str(work),
    }
    if "lb" not in skip:
        print("through the load balancer (1 replica)", flush=True)
        report["lb"] = through_lb(args, clips, work)
    if "bare" not in skip:
        print("bare service", flush=True)
        report["bare"] = bare(args, clips, work)
    if "refusal" not in skip:
        print("refusal cost (bare service, every request refused)", flush=True)
        report["refusal"] = refusal_cost(args, clips, work)
    report["targets"] = check_targets(report)
    shutil.rmtree(work / "wav")  # the logs stay
    return report


def check_targets(r: dict) -> list[dict]:
    if "lb" not in r:
        return []
    lb = r["lb"]
    over = lb["overload"]
    queue_s = float(re.sub(r"[^\d.]", "", r["settings"]["timeout_queue"]) or 0)
    # a request waits up to the queue timeout, then takes the replica's own time (peak p99)
    bound_ms = 1000 * queue_s + (lb["peak"]["accepted_latency_ms"]["p99"] or 0)
    p99 = over["accepted_latency_ms"]["p99"]
    return [
        {
            "name": "goodput at overload / peak, through the LB",
            "value": round(lb["goodput_ratio"], 3),
            "target": f">= {TARGET_GOODPUT}",
            "met": lb["goodput_ratio"] >= TARGET_GOODPUT,
        },
        {
            "name": "accepted p99 at overload (ms), through the LB",
            "value": p99,
            "target": f"<= timeout queue + peak p99 = {bound_ms:.0f}",
            "met": p99 is not None and p99 <= bound_ms,
        },
        {
            "name": "requests refused by the service (Python) through the LB",
            "value": lb["peak"]["refused_by_service"] + over["refused_by_service"],
            "target": "0",
            "met": lb["peak"]["refused_by_service"] + over["refused_by_service"] == 0,
        },
    ]


# --- the report --------------------------------------------------------------------------------


def _ms(x: float | None) -> str:
    return "-" if x is None else f"{x:.0f}"


def _row(path: str, name: str, row: dict) -> str:
    s = row["statuses"]
    other = {k: v for k, v in s.items() if k not in ("200", "503")}
    errs = sum(row["socket_errors"].values())
    acc = row.get("accepted_latency_ms", {}).get("p99")
    who = (
        f"LB {row['refused_by_lb']}, replica {row['refused_by_replica']}"
        if "refused_by_lb" in row
        else f"service {row['refused_by_service']:.0f}"
    )
    cores = ", ".join(f"{k} {v:.2f}" for k, v in row["cores"].items())
    return (
        f"| {path} | {name} | {row['connections']} | {row['goodput_rps']:.1f} | "
        f"{s.get('503', 0)} ({who}) | {other or '-'} / {errs} | {_ms(acc)} | "
        f"{_ms(row['all_answers_latency_ms']['p99'])} | {cores} |"
    )


def markdown(r: dict) -> str:
    m = r["machine"]
    out = [
        "# Overload: through the load balancer and bare",
        "",
        f"{r['date']} · `{r['command']}` (make overload) · {m['cpu']}, {m['cpus']} CPUs · "
        f"{r['haproxy']} · wrk + loadtests/overload.lua, {r['clips']['count']} clips from "
        f"{r['clips']['source']} as 16-bit WAV · {r['settings']['duration_s']} s per run after "
        f"{r['settings']['warmup_s']} s of warm-up",
        "",
        f"HAProxy (docker/haproxy/haproxy.cfg): maxconn {r['settings']['maxconn_per_replica']} "
        f"per replica, timeout queue {r['settings']['timeout_queue']}, retry-on "
        f"{r['settings']['retry_on']}. One replica (`python -m service`, defaults).",
        "",
        "| path | run | connections | goodput req/s | 503 (refused by) | other statuses / "
        "socket errors | accepted p99 ms | all answers p99 ms | cores used |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for path, label in (("lb", "load balancer"), ("bare", "bare service")):
        if path in r:
            out += [_row(label, n, r[path][n]) for n in ("peak", "overload")]
    out.append("")
    for path, label in (("lb", "load balancer"), ("bare", "bare service")):
        if path in r:
            out.append(
                f"- {label}: goodput at overload / peak = **{r[path]['goodput_ratio']:.2f}**"
            )
    out.append(
        "- accepted p99: from HAProxy's log (status 200, Ta) through the LB; wrk cannot split "
        "accepted from refused latencies, so the bare rows show '-' there."
    )
    if ref := r.get("refusal"):
        out += [
            "",
            "## What a refusal costs the bare service",
            "",
            f"Every request refused (ESC50_MAX_QUEUE_SIZE=1, the place held by a stalled upload), "
            f"{ref['connections']} wrk connections sending the clips: "
            f"**{ref['cpu_ms_per_refusal']:.2f} ms of server CPU per refusal** "
            f"({ref['refusals_per_s']:.0f} refusals/s used {ref['server_cores']:.2f} cores; "
            f"statuses {ref['statuses']}, socket errors {ref['socket_errors']}).",
        ]
    if r["targets"]:
        out += [
            "",
            "## Targets (issue 15)",
            "",
            "| check | value | target | met |",
            "|---|---|---|---|",
        ]
        for t in r["targets"]:
            out.append(
                f"| {t['name']} | {t['value']} | {t['target']} | {'yes' if t['met'] else 'NO'} |"
            )
    return "\n".join(out) + "\n"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    report = run(args)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")
    args.out.with_suffix(".md").write_text(markdown(report))
    print(markdown(report))
    return 0 if all(t["met"] for t in report["targets"]) else 1


if __name__ == "__main__":
    sys.exit(main())
