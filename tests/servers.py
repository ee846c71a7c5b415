"""A real uvicorn server in a thread on a free loopback port, for end-to-end tests."""

from __future__ import annotations

import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest
import uvicorn

from service.app import create_app
from service.settings import Settings


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


def free_port() -> int:
    """A loopback port nobody listens on (for a server started as a subprocess)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_ready(
    base: str, proc: subprocess.Popen, timeout_s: float = 300, log: Path | None = None
) -> None:
    """Wait for a server process's /readyz; the test fails (with the tail of `log`, if given)
    when the process exits first or never gets ready."""
    tail = (lambda: log.read_text()[-2000:]) if log else (lambda: "")

    def dead() -> str | None:
        return None if proc.poll() is None else f"the service exited with {proc.returncode}"

    poll_ready(base, dead, timeout_s, tail)


def poll_ready(
    base: str,
    dead: Callable[[], str | None],
    timeout_s: float,
    tail: Callable[[], str] = lambda: "",
) -> None:
    """Poll `base`/readyz until it answers 200; fail the test if `dead()` names a reason first
    or the time runs out (with `tail()`, e.g. the end of the server's log)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        reason = dead()
        if reason:
            pytest.fail(f"{reason} before it was ready: {tail()}")
        try:
            if httpx.get(f"{base}/readyz", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    pytest.fail(f"not ready after {timeout_s:.0f} s: {tail()}")
