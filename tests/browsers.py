"""Debian's chromium driven by Playwright, for the page tests: where it is, and the marks that
skip a module (with the reason) where it or Playwright is missing."""

from __future__ import annotations

import importlib.util
import shutil
from pathlib import Path

import pytest

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
REPORTS = Path(__file__).resolve().parent.parent / "reports"  # screenshots land here
HAVE_PLAYWRIGHT = importlib.util.find_spec("playwright") is not None

browser_marks = [
    pytest.mark.browser,
    pytest.mark.skipif(not HAVE_PLAYWRIGHT, reason="needs playwright: pip install -e .[dev]"),
    pytest.mark.skipif(
        not Path(CHROMIUM).is_file(), reason="needs Debian's chromium: apt-get install chromium"
    ),
]


def launch_chromium(playwright, microphone: Path, *extra: str):
    """Headless chromium whose fake microphone plays `microphone` (a WAV file), granted without
    a prompt."""
    return playwright.chromium.launch(
        executable_path=CHROMIUM,
        args=[
            "--no-sandbox",  # CI runs as root
            "--use-fake-ui-for-media-stream",  # grant the microphone without a prompt
            "--use-fake-device-for-media-stream",
            f"--use-file-for-fake-audio-capture={microphone}",
            *extra,
        ],
    )
