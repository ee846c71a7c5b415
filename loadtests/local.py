"""Running a local service for a test or a measurement: a free port, a clean environment, the
readiness poll, and the service's /metrics as numbers. Standard library only, so the tests, the
benchmark and the soak (under gevent) share it; the service itself never imports it."""

from __future__ import annotations

import http.client
import os
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Callable

# Loopback only: a user's HTTP_PROXY must not carry requests meant for 127.0.0.1.
_DIRECT = urllib.request.build_opener(urllib.request.ProxyHandler({}))


class NotReady(RuntimeError):
    """The server exited, or did not answer 200 on its readiness path in time."""


def free_port(host: str = "127.0.0.1") -> int:
    """A port nobody listens on (for a server started as a subprocess)."""
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def clean_env(**overrides: str) -> dict[str, str]:
    """This process's environment without any ESC50_* variable, plus `overrides`: a server
    started with it runs the settings the caller names, not whatever the user's shell exports
    (an ESC50_API_TOKEN there would turn every unauthenticated request into a 401)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("ESC50_")}
    # gRPC off unless asked: servers started side by side would all want port 8001
    return {**env, "ESC50_GRPC_PORT": "0", **overrides}


def exited(proc: subprocess.Popen) -> Callable[[], str | None]:
    """For `wait_ready`: why `proc` can no longer get ready (None while it runs)."""
    args = proc.args
    cmd = " ".join(map(str, args)) if isinstance(args, list | tuple) else str(args)
    return lambda: None if proc.poll() is None else f"`{cmd}` exited with {proc.returncode}"


def get(url: str, timeout: float = 5) -> tuple[int, bytes]:
    """Status and body of a GET, without proxies; a 4xx/5xx is an answer, not an exception."""
    try:
        with _DIRECT.open(url, timeout=timeout) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def wait_ready(
    base: str,
    dead: Callable[[], str | None] = lambda: None,
    timeout_s: float = 300,
    tail: Callable[[], str] = lambda: "",
    path: str = "/readyz",
) -> None:
    """Poll `base`+`path` until it answers 200. Raises NotReady when `dead()` names a reason
    first (see `exited`) or the time runs out; the message ends with `tail()` (e.g. the end of
    the server's log)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        reason = dead()
        if reason:
            raise NotReady(_with_tail(f"{reason} before it was ready", tail))
        try:
            if get(base + path, timeout=2)[0] == 200:
                return
        except (OSError, http.client.HTTPException):
            pass  # not listening yet, or closed the connection while starting
        time.sleep(0.1)
    raise NotReady(_with_tail(f"{base}{path} not ready after {timeout_s:g} s", tail))


def _with_tail(message: str, tail: Callable[[], str]) -> str:
    text = tail()
    return f"{message}: {text}" if text else message


def parse_metrics(text: str) -> dict[str, float]:
    """A Prometheus text exposition as {series: value}, each series as written on its line,
    labels included: 'esc50_requests_rejected_total{reason="queue_full"}'. prometheus_client
    writes no timestamps, so the value is the last field."""
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            series, _, value = line.rpartition(" ")
            out[series] = float(value)
    return out


def scrape_metrics(base: str, timeout: float = 30) -> dict[str, float]:
    """The service's /metrics, parsed (`parse_metrics`)."""
    status, body = get(f"{base}/metrics", timeout)
    if status != 200:
        raise OSError(f"{base}/metrics answered {status}")
    return parse_metrics(body.decode())
