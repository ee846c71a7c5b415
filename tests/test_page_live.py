"""The page's live mode in Debian's chromium (Playwright): its fake microphone plays known clips,
the page streams them to WS /v1/stream, and every label it shows is /v1/classify's answer for
the same 5 s (the samples the page sent, read back from the WebSocket's frames)."""

from __future__ import annotations

import io
import json
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
import soundfile as sf
from browsers import HAVE_PLAYWRIGHT, REPORTS, browser_marks, launch_chromium
from servers import serve

from contract.audio import read_audio
from service.settings import Settings

if HAVE_PLAYWRIGHT:
    from playwright.sync_api import Browser, Page, WebSocket, sync_playwright

pytestmark = browser_marks

SHIPPED = Path(__file__).resolve().parent.parent / "models" / "esc50-resnet34.int8.onnx"
SR = 44100


@pytest.fixture(scope="module")
def clips(tmp_path_factory) -> Path:
    """Three real ESC-50 clips of different classes, one after the other, as 16-bit WAV (what
    Chrome's fake microphone reads, looping); generated tones where ../shared is absent."""
    from conftest import ESC50

    out = tmp_path_factory.mktemp("live") / "clips.wav"
    picks = [sorted((ESC50 / "audio").glob(f"*-{c}.*"))[:1] for c in (0, 10, 20)]  # dog, rain, baby
    if all(picks):
        parts = [np.resize(read_audio(p[0]).waveform, 5 * SR) for p in picks]
    else:
        t = np.arange(5 * SR) / SR
        parts = [0.3 * np.sin(2 * np.pi * f * t).astype(np.float32) for f in (220, 880, 3000)]
    sf.write(out, np.concatenate(parts), SR, subtype="PCM_16")
    return out


@pytest.fixture(scope="module")
def server(request) -> Iterator[str]:
    model = SHIPPED if SHIPPED.is_file() else request.getfixturevalue("tiny_onnx")
    with serve(Settings(model_path=model, intra_op_threads=1)) as base:
        yield base


@pytest.fixture(scope="module")
def browser(clips: Path) -> Iterator[Browser]:
    REPORTS.mkdir(exist_ok=True)
    with sync_playwright() as p:
        b = launch_chromium(p, clips, "--autoplay-policy=no-user-gesture-required")
        yield b
        b.close()


class Frames:
    """What went over the page's WebSocket: the config, the PCM sent, the events received."""

    def __init__(self) -> None:
        self.sent: list[str | bytes] = []
        self.events: list[dict] = []

    def watch(self, ws: WebSocket) -> None:
        ws.on("framesent", lambda m: self.sent.append(m))
        ws.on("framereceived", lambda m: self.events.append(json.loads(m)))

    def pcm(self) -> np.ndarray:
        return np.frombuffer(b"".join(m for m in self.sent if isinstance(m, bytes)), "<f4")


def live_page(browser: Browser, width: int) -> tuple[Page, Frames, list[str]]:
    context = browser.new_context(viewport={"width": width, "height": 900}, is_mobile=width < 500)
    page = context.new_page()
    frames, errors = Frames(), []
    page.on("websocket", frames.watch)
    page.on("pageerror", lambda e: errors.append(str(e)))
    return page, frames, errors


def test_live_labels_equal_classify_on_the_same_windows(server: str, browser: Browser) -> None:
    page, frames, errors = live_page(browser, 1000)
    page.goto(server)
    page.focus("#live")
    page.keyboard.press("Enter")  # by keyboard, as any button
    page.wait_for_selector("#live[aria-pressed=true]")
    page.wait_for_function(
        "document.querySelectorAll('#live-timeline li').length >= 4", timeout=60_000
    )
    page.click("#live")  # stop: the service answers what is left, then closes normally
    page.wait_for_selector("#live[aria-pressed=false]", timeout=30_000)
    assert page.inner_text("#live-status") == "Stopped."
    page.screenshot(path=REPORTS / "page-live.png", full_page=True)

    config = json.loads(frames.sent[0])
    assert config["sample_rate"] == SR and config["encoding"] == "pcm_f32le"
    (start,) = [e for e in frames.events if e["type"] == "start"]
    model = start["model"]
    assert f"{model['name']} version {model['version']}" in page.inner_text("#live-model")
    windows = [e for e in frames.events if e["type"] == "window"]
    shown = page.locator("#live-timeline li").all_inner_texts()
    assert shown == [w["predictions"][0]["label"] for w in windows] and len(shown) >= 4
    pcm = frames.pcm()
    for w in windows:  # the same 5 s, as /v1/classify gets them in a WAV
        a = round(w["start_s"] * SR)
        buf = io.BytesIO()
        sf.write(buf, pcm[a : a + 5 * SR], SR, format="WAV", subtype="FLOAT")
        r = httpx.post(f"{server}/v1/classify", content=buf.getvalue(), params={"top_k": 5})
        assert r.status_code == 200, r.text
        assert w["predictions"] == r.json()["predictions"], w["start_s"]
        assert w["model"] == r.json()["model"] == model
    assert not errors, errors


def test_live_at_phone_width(server: str, browser: Browser) -> None:
    page, _, errors = live_page(browser, 380)
    page.goto(server)
    page.click("#live")
    page.wait_for_selector("#live-predictions li", timeout=60_000)
    assert page.evaluate("document.documentElement.scrollWidth") <= 380  # no sideways scroll
    page.screenshot(path=REPORTS / "page-live-phone.png", full_page=True)
    page.click("#live")
    page.wait_for_selector("#live[aria-pressed=false]", timeout=30_000)
    assert not errors, errors
