"""A real uvicorn server in a thread on a free loopback port, for end-to-end tests; the helpers
for servers started as subprocesses come from loadtests/local.py (shared with the benchmark and
the soak) with a test failure in place of NotReady."""

from __future__ import annotations

import socket
import subprocess
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import uvicorn

from loadtests import local
from loadtests.local import clean_env, exited, free_port, parse_metrics, scrape_metrics
from service.app import create_app
from service.settings import Settings

__all__ = ["clean_env", "free_port", "parse_metrics", "scrape_metrics", "serve", "wait_ready"]


@contextmanager
def serve(settings: Settings, backend_loader=None) -> Iterator[str]:
    """Run the app under uvicorn in a thread on a free loopback port; yield its base URL."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    base = f"http://127.0.0.1:{sock.getsockname()[1]}"
    config = uvicorn.Config(create_app(settings, backend_loader), log_level="warning")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        poll_ready(base, lambda: None if thread.is_alive() else "the server thread died", 60)
        yield base
    finally:
        server.should_exit = True
        thread.join(30)
        sock.close()


def wait_ready(
    base: str, proc: subprocess.Popen, timeout_s: float = 300, log: Path | None = None
) -> None:
    """Wait for a server process's /readyz; the test fails (with the tail of `log`, if given)
    when the process exits first or never gets ready."""
    tail = (lambda: log.read_text()[-2000:]) if log else (lambda: "")
    poll_ready(base, exited(proc), timeout_s, tail)


def poll_ready(
    base: str,
    dead: Callable[[], str | None],
    timeout_s: float,
    tail: Callable[[], str] = lambda: "",
) -> None:
    """loadtests.local.wait_ready, failing the test instead of raising NotReady."""
    try:
        local.wait_ready(base, dead, timeout_s, tail)
    except local.NotReady as e:
        pytest.fail(str(e))
