"""Soak test (make soak; make soak-ci for the 2-minute version): Locust in-process at a fixed
share of the measured saturation, for a long time, while the service's memory, file descriptors
and latency are sampled. Writes REPORT.json, REPORT.md and REPORT.png.

    python loadtests/soak.py                       # 30 min against a service it starts itself
    python loadtests/soak.py --duration 120 --warmup 30 --calibrate 20     # the CI version
    python loadtests/soak.py --host http://127.0.0.1:8000   # a running one: ONE replica, not a
                                                            # load balancer (memory is per process)

Phases: start the service (`python -m service` on a free loopback port, unless --host), measure
saturation with closed-loop users that never wait (--calibrate seconds), then run --users users
whose combined rate is --load x saturation, mixing real clips, formats, lengths, multipart and
invalid uploads (loadtests/locustfile.py). RSS and open FDs come from the service's own /metrics
(process_resident_memory_bytes, process_open_fds) every --sample-every seconds.

Verdicts: no failed request (a 503 the service sends when it sheds load, its queue full by count
or by expected wait, is counted apart and allowed up to --max-shed-ratio, 0 by default); RSS and
FDs after warm-up grow at most 5 % (median of the last window vs the first window after warm-up;
FDs also pass within 2 descriptors, sockets come and go); classify p99 of the last window at
most --max-p99-drift x that of the first. Window = min(5 min, a third of the time after
warm-up). Exit 1 when a verdict fails.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import resource
import signal
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import gevent
from locust import constant, constant_throughput
from locust.env import Environment

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from local import NotReady, clean_env, exited, free_port, scrape_metrics, wait_ready  # noqa: E402
from locustfile import ServiceUser  # noqa: E402  (needs HERE on sys.path)

from contract.machine import cpu_model  # noqa: E402

REPO = HERE.parent
log = logging.getLogger("esc50.soak")
MAX_WINDOW_S = 300.0  # "p99 of the last 5 min vs the first 5 min"
GROWTH_LIMIT = 0.05  # RSS / FD growth allowed after warm-up
FD_SLACK = 2  # descriptors: a keep-alive socket more or less is not a leak
BUCKET_S = 30.0  # latency plot resolution
STOP_TIMEOUT_S = 30.0  # at the end, users finish the request they are in (no upload cut off)


@dataclass
class Record:
    """What the run saw: requests (time, latency ms, outcome, name) and /metrics samples.
    outcome: "ok", "shed" (503: the service refused it for overload, by design) or "error"."""

    requests: list[tuple[float, float, str, str]] = field(default_factory=list)
    samples: list[dict] = field(default_factory=list)
    failures: dict[str, int] = field(default_factory=dict)


# --- the service under test ------------------------------------------------------------------


def start_service(log_path: Path) -> tuple[subprocess.Popen, str]:
    """`python -m service` with its defaults (none of the shell's ESC50_* settings)."""
    port = free_port()
    env = clean_env(ESC50_HOST="127.0.0.1", ESC50_PORT=str(port), ESC50_LOG_LEVEL="warning")
    out = log_path.open("w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "service"], cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT
    )
    return proc, f"http://127.0.0.1:{port}"


def wait_service(host: str, proc: subprocess.Popen | None, timeout: float = 120) -> None:
    try:
        wait_ready(host, exited(proc) if proc else lambda: None, timeout)
    except NotReady as e:
        raise SystemExit(str(e)) from None


def scrape(host: str) -> dict[str, float]:
    """The process gauges and counters this report uses, from the service's /metrics."""
    wanted = ("process_resident_memory_bytes", "process_open_fds", "process_cpu_seconds_total")
    return {k: v for k, v in scrape_metrics(host, timeout=5).items() if k in wanted}


def served_model(host: str) -> dict:
    """Which artifact the service runs (from /v1/models): RSS depends on it."""
    doc = json.loads(urllib.request.urlopen(f"{host}/v1/models", timeout=5).read())
    card = doc["models"][0]
    return {k: card.get(k) for k in ("name", "version", "variant", "backend", "provider")}


# --- load ------------------------------------------------------------------------------------


def run_users(env: Environment, users: int, seconds: float, rec: Record | None) -> int:
    """Run `users` users for `seconds`; returns how many requests succeeded (fast 503s while
    overloaded must not count as throughput)."""
    count = [0]

    def on_request(name, response_time, exception, response=None, **_kw):
        count[0] += exception is None
        if rec is not None:
            shed = getattr(response, "status_code", None) == 503
            outcome = "ok" if exception is None else "shed" if shed else "error"
            rec.requests.append((time.time(), response_time, outcome, name))
            if exception is not None:
                key = f"{name}: {str(exception)[:80]}"
                rec.failures[key] = rec.failures.get(key, 0) + 1

    env.events.request.add_listener(on_request)
    runner = env.create_local_runner()
    runner.start(users, spawn_rate=users)
    gevent.sleep(seconds)
    runner.quit()
    env.events.request.remove_listener(on_request)
    return count[0]


def calibrate(host: str, users: int, seconds: float) -> float:
    """Saturation throughput (successful requests/s of the traffic mix), users never waiting."""

    class Saturating(ServiceUser):
        wait_time = constant(0)

    run_users(
        Environment(user_classes=[Saturating], host=host, stop_timeout=STOP_TIMEOUT_S),
        users,
        3,
        None,
    )  # ramp
    done = run_users(
        Environment(user_classes=[Saturating], host=host, stop_timeout=STOP_TIMEOUT_S),
        users,
        seconds,
        None,
    )
    return done / seconds


def sampler(host: str, every: float, rec: Record) -> None:
    """The service's gauges, and the machine's 1-min load average (other work shows up there)."""
    while True:
        try:
            rec.samples.append({"t": time.time(), "loadavg1": os.getloadavg()[0], **scrape(host)})
        except OSError as e:
            log.warning("metrics scrape failed: %s", e)
        gevent.sleep(every)


# --- analysis --------------------------------------------------------------------------------


def p99(values: list[float]) -> float | None:
    if not values:
        return None
    s = sorted(values)
    return s[min(len(s) - 1, int(0.99 * len(s)))]


def median(values: list[float]) -> float:
    s = sorted(values)
    return s[len(s) // 2]


def is_classify(name: str) -> bool:
    return name.startswith("/classify") and "invalid" not in name


def analyse(rec: Record, t_start: float, args: argparse.Namespace) -> dict:
    t_warm = t_start + args.warmup
    t_end = t_start + args.duration
    window = min(MAX_WINDOW_S, (t_end - t_warm) / 3)
    lat = [
        (t, ms) for t, ms, outcome, name in rec.requests if outcome == "ok" and is_classify(name)
    ]
    first = [ms for t, ms in lat if t_warm <= t < t_warm + window]
    last = [ms for t, ms in lat if t >= t_end - window]
    p99_first, p99_last = p99(first), p99(last)
    drift = p99_last / p99_first if p99_first and p99_last else None

    def growth(key: str) -> dict:
        early = [s[key] for s in rec.samples if t_warm <= s["t"] < t_warm + window and key in s]
        late = [s[key] for s in rec.samples if s["t"] >= t_end - window and key in s]
        if not early or not late:
            return {"first": None, "last": None, "growth": None, "max": None}
        a, b = median(early), median(late)
        after = [s[key] for s in rec.samples if s["t"] >= t_warm and key in s]
        return {"first": a, "last": b, "growth": (b - a) / a, "max": max(after)}

    rss, fds = growth("process_resident_memory_bytes"), growth("process_open_fds")
    errors = sum(1 for r in rec.requests if r[2] == "error")
    shed = sum(1 for r in rec.requests if r[2] == "shed")
    shed_ratio = shed / max(1, len(rec.requests))
    verdicts = {
        "no failed request (besides 503 load shedding)": errors == 0 and len(rec.requests) > 0,
        f"503 load shedding <= {args.max_shed_ratio:.1%}": shed_ratio <= args.max_shed_ratio,
        "RSS growth <= 5 %": rss["growth"] is not None and rss["growth"] <= GROWTH_LIMIT,
        "FD growth <= 5 % (or <= 2 fds)": fds["growth"] is not None
        and (fds["growth"] <= GROWTH_LIMIT or fds["last"] - fds["first"] <= FD_SLACK),
        f"p99 drift <= {args.max_p99_drift}x": drift is not None and drift <= args.max_p99_drift,
    }
    return {
        "requests": len(rec.requests),
        "classify_requests": len(lat),
        "errors": errors,
        "shed_503": shed,
        "failures": rec.failures,
        "achieved_rps": len(rec.requests) / args.duration,
        "window_s": window,
        "p99_first_ms": p99_first,
        "p99_last_ms": p99_last,
        "p99_drift": drift,
        "rss_bytes": rss,
        "open_fds": fds,
        "verdicts": verdicts,
        "passed": all(verdicts.values()),
    }


# --- the report ------------------------------------------------------------------------------


def plot(rec: Record, t_start: float, args: argparse.Namespace, path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log.warning("matplotlib not installed: no plot")
        return False
    fig, (ax1, ax2, ax3, ax4) = plt.subplots(4, 1, figsize=(9, 10), sharex=True)
    ts = [(s["t"] - t_start) / 60 for s in rec.samples]
    rss = [s.get("process_resident_memory_bytes", 0) / 2**20 for s in rec.samples]
    ax1.plot(ts, rss)
    ax1.set_ylim(0, max(rss, default=1) * 1.2)  # from 0: a 1 MiB wobble must not look like a leak
    ax1.set_ylabel("RSS (MiB)")
    fds = [s.get("process_open_fds", 0) for s in rec.samples]
    ax2.plot(ts, fds, color="tab:green")
    ax2.set_ylim(0, max(fds, default=1) * 1.5)
    ax2.set_ylabel("open FDs")
    ax4.plot(ts, [s.get("loadavg1", 0) for s in rec.samples], color="tab:purple")
    ax4.axhline(os.cpu_count() or 1, color="grey", linewidth=0.8)
    ax4.set_ylabel("machine load (1 min)")
    buckets: dict[int, list[float]] = {}
    for t, ms, outcome, name in rec.requests:
        if outcome == "ok" and is_classify(name):
            buckets.setdefault(int((t - t_start) // BUCKET_S), []).append(ms)
    xs = sorted(buckets)
    ax3.plot(
        [(x + 0.5) * BUCKET_S / 60 for x in xs],
        [p99(buckets[x]) for x in xs],
        color="tab:red",
        marker=".",
    )
    ax3.set_ylim(0, max((p99(v) or 0 for v in buckets.values()), default=1) * 1.2)
    ax3.set_ylabel(f"classify p99 (ms, {BUCKET_S:.0f} s bins)")
    ax4.set_xlabel("minutes")
    for ax in (ax1, ax2, ax3, ax4):
        ax.axvline(args.warmup / 60, color="grey", linestyle="--", linewidth=0.8)
        ax.grid(alpha=0.3)
    ax1.set_title("soak: RSS, open FDs, p99, machine load (dashed: end of warm-up)")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return True


def markdown(report: dict) -> str:
    r, c = report["results"], report["config"]
    mib = 2**20
    rss, fds = r["rss_bytes"], r["open_fds"]
    loads = [x["loadavg1"] for x in report["samples"] if "loadavg1" in x] or [0.0]
    load = {"min": min(loads), "max": max(loads)}
    lines = [
        f"# Soak report {report['started_utc']}",
        "",
        f"- Ran **{c['duration_s'] / 60:.1f} min** (warm-up {c['warmup_s']:.0f} s) against "
        f"{report['target']} on {report['machine']['cpu']} ({report['machine']['cores']} cores), "
        f"Locust in the same machine. {report['note']}",
        "- Model served: {name} {version} ({variant}) on {backend}/{provider}.".format(
            **report["model"]
        ),
        f"- Load: {c['users']} users at {c['load']:.0%} of the measured saturation "
        f"({report['saturation_rps']:.1f} req/s of the traffic mix over {c['calibrate_s']:.0f} s)"
        f" = target {report['target_rps']:.1f} req/s; achieved {r['achieved_rps']:.1f} req/s.",
        f"- Requests: {r['requests']} ({r['classify_requests']} classify); errors "
        f"{r['errors']}; refused with 503 for overload (the service's load shedding) "
        f"{r['shed_503']}.",
        f"- RSS: {rss['first'] / mib:.0f} MiB first window after warm-up -> {rss['last'] / mib:.0f}"
        f" MiB last window ({rss['growth']:+.1%}), max {rss['max'] / mib:.0f} MiB.",
        f"- Open FDs: {fds['first']:.0f} -> {fds['last']:.0f} ({fds['growth']:+.1%}), "
        f"max {fds['max']:.0f}.",
        f"- Classify p99: first {r['window_s']:.0f} s after warm-up {r['p99_first_ms']:.0f} ms, "
        f"last {r['window_s']:.0f} s {r['p99_last_ms']:.0f} ms (drift x{r['p99_drift']:.2f}).",
        f"- Locust process CPU: {report['locust_cpu_s']:.0f} s over the run. Machine load "
        f"average (1 min) during the run: {load['min']:.1f}-{load['max']:.1f} on "
        f"{report['machine']['cores']} cores (the service and Locust account for up to "
        f"{report['machine']['cores']}; the rest is other work).",
        f"- The service stopped on SIGTERM with exit code {report['service_exit_code']} "
        "(-15: uvicorn re-raises SIGTERM after its graceful shutdown)."
        if report["service_exit_code"] is not None
        else "- The service was not started by the soak (--host).",
        "",
        "| verdict | |",
        "|---|---|",
        *[f"| {k} | {'pass' if v else '**FAIL**'} |" for k, v in r["verdicts"].items()],
        "",
        f"![RSS, FDs and p99 over time]({report['plot']})" if report["plot"] else "",
    ]
    return "\n".join(lines) + "\n"


# --- main ------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--host", help="a running service (one replica); default: start one here")
    p.add_argument("--duration", type=float, default=1800, help="soak seconds (after calibration)")
    p.add_argument("--warmup", type=float, default=120, help="seconds excluded from growth checks")
    p.add_argument("--calibrate", type=float, default=60, help="seconds measuring saturation")
    p.add_argument("--rps", type=float, help="target req/s; skips calibration")
    p.add_argument("--load", type=float, default=0.8, help="share of saturation to run at")
    p.add_argument("--users", type=int, default=8, help="Locust users (also for calibration)")
    p.add_argument("--sample-every", type=float, default=5, help="seconds between /metrics reads")
    p.add_argument("--max-p99-drift", type=float, default=1.5, help="last/first window p99")
    p.add_argument(
        "--max-shed-ratio", type=float, default=0.0, help="share of 503 (overload) answers allowed"
    )
    p.add_argument("--note", default="", help="a sentence for the report (e.g. other load)")
    p.add_argument("--out", type=Path, help="report prefix (default reports/soak-<utc time>)")
    args = p.parse_args(argv)
    if args.duration <= args.warmup:
        p.error("--duration must be longer than --warmup")
    return args


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    logging.getLogger("locust").setLevel(logging.WARNING)
    args = parse_args(argv)
    started = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    out = args.out or REPO / "reports" / f"soak-{started}"
    out.parent.mkdir(parents=True, exist_ok=True)
    proc, host = None, args.host
    service_log = out.with_suffix(".service.log")  # kept only when the service said something
    if host is None:
        proc, host = start_service(service_log)
    try:
        wait_service(host, proc)
        model = served_model(host)
        saturation = (
            args.rps / args.load if args.rps else calibrate(host, args.users, args.calibrate)
        )
        target = args.rps or args.load * saturation
        log.info(
            "saturation %.1f req/s -> soak at %.1f req/s for %.0f s with %d users",
            saturation,
            target,
            args.duration,
            args.users,
        )

        class Soaking(ServiceUser):
            wait_time = constant_throughput(target / args.users)

        rec = Record()
        cpu0 = resource.getrusage(resource.RUSAGE_SELF)
        t_start = time.time()
        sampling = gevent.spawn(sampler, host, args.sample_every, rec)
        run_users(
            Environment(user_classes=[Soaking], host=host, stop_timeout=STOP_TIMEOUT_S),
            args.users,
            args.duration,
            rec,
        )
        sampling.kill()
        cpu1 = resource.getrusage(resource.RUSAGE_SELF)
    finally:
        if proc is not None:
            proc.send_signal(signal.SIGTERM)
            proc.wait(60)
            if service_log.stat().st_size == 0:
                service_log.unlink()
    results = analyse(rec, t_start, args)
    png = out.with_suffix(".png")
    report = {
        "started_utc": started,
        "target": "a service started by soak.py (`python -m service`, defaults)" if proc else host,
        "machine": {"cpu": cpu_model(), "cores": os.cpu_count(), "python": sys.version.split()[0]},
        "note": args.note,
        "model": model,
        "config": {
            "duration_s": args.duration,
            "warmup_s": args.warmup,
            "calibrate_s": 0 if args.rps else args.calibrate,
            "users": args.users,
            "load": args.load,
            "sample_every_s": args.sample_every,
            "max_p99_drift": args.max_p99_drift,
            "max_shed_ratio": args.max_shed_ratio,
        },
        "saturation_rps": saturation,
        "target_rps": target,
        "locust_cpu_s": (cpu1.ru_utime + cpu1.ru_stime) - (cpu0.ru_utime + cpu0.ru_stime),
        "service_exit_code": proc.returncode if proc else None,
        "results": results,
        "plot": png.name if plot(rec, t_start, args, png) else None,
        "samples": [{k: round(v, 3) for k, v in s.items()} for s in rec.samples],
    }
    out.with_suffix(".json").write_text(json.dumps(report, indent=1))
    out.with_suffix(".md").write_text(markdown(report))
    print(markdown(report))
    print(f"report: {out}.md / .json / .png")
    return 0 if results["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
