"""`python -m loadtests.serve_lb` (= `make serve-lb REPLICAS=n LB_PORT=p`): the load balancer
in front of local replicas, without Docker.

  - n replicas (`python -m service`, any ESC50_* setting from the environment) on 127.0.0.1,
    ports p+1 .. p+n;
  - Debian's `haproxy` with the compose stack's own docker/haproxy/haproxy.cfg on 127.0.0.1:p,
    plus a generated file with one `server` line per replica (the cfg's `backend api` is for
    Docker's DNS; ESC50_LB_LOCAL switches it off); HAProxy's stats on 127.0.0.1:p+n+1
    (/stats, /metrics);
  - Ctrl-C or SIGTERM stops them all: HAProxy first (no new work; open requests finish), then
    the replicas drain.

It lives in loadtests/ because the overload benchmark (loadtests/overload.py) and the tests
start it as a context manager, `local_lb(...)`.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from loadtests.local import NotReady, wait_ready

REPO = Path(__file__).resolve().parent.parent
HAPROXY_CFG = REPO / "docker" / "haproxy" / "haproxy.cfg"
STARTUP_S = 300  # model load + warm-up of every replica on a busy 2-core machine
STOP_S = 45  # a replica's drain (ESC50_DRAIN_TIMEOUT_S, 30 s) + margin


@dataclass
class LocalLB:
    url: str  # the load balancer, http://127.0.0.1:p
    replicas: list[str]  # each replica's own URL
    stats_url: str  # HAProxy's stats page (append ";csv" for CSV) and /metrics
    haproxy: subprocess.Popen
    services: list[subprocess.Popen] = field(default_factory=list)
    log_dir: Path = Path()

    @property
    def processes(self) -> list[subprocess.Popen]:
        return [self.haproxy, *self.services]


def _die_with_parent() -> None:
    """In the child: SIGTERM when the launcher dies, even by SIGKILL: no stray replicas. (Linux
    sends it when the thread that started the child ends: start them from the main thread.)"""
    libc = ctypes.CDLL("libc.so.6", use_errno=True)
    libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def spawn(cmd: list[str], log: Path, env: dict[str, str]) -> subprocess.Popen:
    # Its own session: a terminal's Ctrl-C reaches the launcher only, which stops the children
    # in order (HAProxy first) instead of all of them at once.
    with log.open("wb") as out:
        return subprocess.Popen(
            cmd,
            cwd=REPO,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            preexec_fn=_die_with_parent,
        )


def free_port_block(n: int) -> int:
    """A port p with p .. p+n-1 all free on 127.0.0.1 (the LB, its replicas, its stats)."""
    for _ in range(100):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            base = int(s.getsockname()[1])
        if base + n < 65535 and all(_port_free(base + i) for i in range(n)):
            return base
    raise RuntimeError(f"no {n} consecutive free ports")


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def servers_cfg(ports: list[int]) -> str:
    """The local `backend api` and `backend streams`: everything else comes from haproxy.cfg's
    `defaults replicas` and `defaults streams`."""
    servers = [f"    server replica{i} 127.0.0.1:{p}" for i, p in enumerate(ports, 1)]
    lines = ["backend api from replicas", *servers, "", "backend streams from streams", *servers]
    return "\n".join(lines) + "\n"


def wait_all_ready(url: str, procs: list[subprocess.Popen], timeout_s: float, logs: Path) -> None:
    """`url` answers 200 (NotReady, naming the logs, if one of `procs` exits first)."""

    def dead() -> str | None:
        gone = [p for p in procs if p.poll() is not None]
        return f"{gone[0].args} exited with {gone[0].returncode}" if gone else None

    wait_ready(url, dead, timeout_s, tail=lambda: f"logs in {logs}", path="")


def stop(lb: LocalLB) -> None:
    """HAProxy first, softly (SIGUSR1: it stops listening and exits once the requests it holds
    are answered), then every replica drains (SIGTERM)."""
    if lb.haproxy.poll() is None:
        lb.haproxy.send_signal(signal.SIGUSR1)
    reap(lb.haproxy, STOP_S)
    for proc in lb.services:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
    for proc in lb.services:
        reap(proc, STOP_S)


def reap(proc: subprocess.Popen, timeout_s: float) -> None:
    try:
        proc.wait(timeout_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


@contextlib.contextmanager
def local_lb(
    replicas: int,
    port: int,
    env: dict[str, str] | None = None,
    maxconn: int | None = None,
    queue_timeout: str | None = None,
    log_dir: Path | None = None,
    startup_s: float = STARTUP_S,
) -> Iterator[LocalLB]:
    """Start `replicas` services and HAProxy in front of them; yield when the LB answers
    /readyz; stop them all on the way out. `env`: the replicas' environment (this process's
    if None; `local.clean_env(...)` for named settings only). `maxconn` and `queue_timeout`
    (HAProxy's syntax: "3s") override the cfg's. Logs go to `log_dir` (a temp dir if None)."""
    haproxy = shutil.which("haproxy")
    if haproxy is None:
        raise RuntimeError("haproxy is not installed (Debian: apt-get install haproxy)")
    logs = log_dir or Path(tempfile.mkdtemp(prefix="esc50-lb."))
    logs.mkdir(parents=True, exist_ok=True)
    ports = [port + i for i in range(1, replicas + 1)]
    stats_port = port + replicas + 1
    base_env = dict(os.environ if env is None else env)
    services = [
        spawn(
            [sys.executable, "-m", "service"],
            logs / f"replica{i}.log",
            {**base_env, "ESC50_HOST": "127.0.0.1", "ESC50_PORT": str(p)},
        )
        for i, p in enumerate(ports, 1)
    ]
    (logs / "servers.cfg").write_text(servers_cfg(ports))
    lb_env = {
        **os.environ,
        "ESC50_LB_LOCAL": "1",
        "ESC50_LB_BIND": f"127.0.0.1:{port}",
        "ESC50_LB_STATS_BIND": f"127.0.0.1:{stats_port}",
        **({"ESC50_LB_REPLICA_MAXCONN": str(maxconn)} if maxconn else {}),
        **({"ESC50_LB_TIMEOUT_QUEUE": queue_timeout} if queue_timeout else {}),
    }
    cmd = [haproxy, "-f", str(HAPROXY_CFG), "-f", str(logs / "servers.cfg")]
    lb = LocalLB(
        url=f"http://127.0.0.1:{port}",
        replicas=[f"http://127.0.0.1:{p}" for p in ports],
        stats_url=f"http://127.0.0.1:{stats_port}/stats",
        haproxy=spawn(cmd, logs / "haproxy.log", lb_env),
        services=services,
        log_dir=logs,
    )
    try:
        for url in lb.replicas:
            wait_all_ready(f"{url}/readyz", lb.processes, startup_s, logs)
        # HAProxy's health checks (every 2 s) must have seen a replica up; through the LB.
        wait_all_ready(f"{lb.url}/readyz", lb.processes, 30, logs)
        yield lb
    finally:
        stop(lb)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m loadtests.serve_lb", description=__doc__)
    p.add_argument("--replicas", type=int, default=1, help="local replicas (1)")
    p.add_argument("--port", type=int, default=8000, help="the LB's port; replicas after it")
    p.add_argument("--maxconn", type=int, help="requests per replica at once (the cfg's: 16)")
    p.add_argument("--log-dir", type=Path, help="logs of HAProxy and every replica")
    args = p.parse_args(argv)

    def terminate(signum: int, frame: object) -> None:
        for s in (signal.SIGINT, signal.SIGTERM):  # a second Ctrl-C must not cut the stop short
            signal.signal(s, signal.SIG_IGN)
        raise KeyboardInterrupt  # unwinds through local_lb's `finally`: everything stops

    signal.signal(signal.SIGINT, terminate)
    signal.signal(signal.SIGTERM, terminate)
    try:
        with local_lb(args.replicas, args.port, maxconn=args.maxconn, log_dir=args.log_dir) as lb:
            print(
                f"load balancer {lb.url} -> {', '.join(lb.replicas)}; HAProxy stats "
                f"{lb.stats_url}; logs in {lb.log_dir}. Ctrl-C stops them all.",
                flush=True,
            )
            signal.pause()
    except KeyboardInterrupt:
        pass
    except (NotReady, RuntimeError) as e:
        print(f"serve-lb: {e}", file=sys.stderr)
        return 1
    print("serve-lb: stopped", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
