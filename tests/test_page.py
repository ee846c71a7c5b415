"""The page in a real browser: Debian's chromium, headless, driven by Playwright, against a real
uvicorn serving the tiny model and its explain artifact. Screenshots go to reports/page-*.png."""

from __future__ import annotations

import base64
import shutil
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
import soundfile as sf
from browsers import HAVE_PLAYWRIGHT, REPORTS, browser_marks, launch_chromium
from servers import serve

from service.settings import Settings

if HAVE_PLAYWRIGHT:
    from playwright.sync_api import Browser, Page, sync_playwright

pytestmark = browser_marks


# Every pixel's mean over R, G, B: the variance says whether a canvas shows anything.
CANVAS_STATS = """(id) => {
  const c = document.getElementById(id);
  const d = c.getContext("2d").getImageData(0, 0, c.width, c.height).data;
  let n = 0, sum = 0, sq = 0, opaque = 0;
  for (let i = 0; i < d.length; i += 4) {
    const v = (d[i] + d[i + 1] + d[i + 2]) / 3;
    n++; sum += v; sq += v * v; if (d[i + 3] > 0) opaque++;
  }
  const mean = sum / n;
  return { width: c.width, height: c.height, variance: sq / n - mean * mean, opaque };
}"""


@pytest.fixture(scope="module")
def clip(tmp_path_factory) -> Path:
    """A real ESC-50 clip as 16-bit WAV (what Chrome's fake microphone reads); a generated
    tone where ../shared is absent."""
    from conftest import ESC50

    out = tmp_path_factory.mktemp("page") / "clip.wav"
    real = sorted((ESC50 / "audio").glob("*-0.*"))  # dog barks
    if real:
        x, sr = sf.read(real[0], dtype="float32")
    else:
        from synth import SR, tone

        x, sr = tone(440.0), SR
    sf.write(out, x, sr, subtype="PCM_16")
    return out


@pytest.fixture(scope="module")
def server(tiny_onnx: Path, tiny_explain_onnx: Path) -> Iterator[str]:
    settings = Settings(
        model_path=tiny_onnx, explain_model_path=tiny_explain_onnx, intra_op_threads=1
    )
    with serve(settings) as base:
        yield base


@pytest.fixture(scope="module")
def browser(clip: Path) -> Iterator[Browser]:
    REPORTS.mkdir(exist_ok=True)
    with sync_playwright() as p:
        b = launch_chromium(p, clip)
        yield b
        b.close()


@pytest.fixture
def page(browser: Browser) -> Iterator[Page]:
    context = browser.new_context(viewport={"width": 1000, "height": 900})
    pg = context.new_page()
    errors: list[str] = []
    pg.on("pageerror", lambda e: errors.append(str(e)))
    yield pg
    context.close()
    assert not errors, errors  # no uncaught script errors on any page


def classify(base: str, path: Path) -> dict:
    r = httpx.post(
        f"{base}/v1/classify",
        content=path.read_bytes(),
        headers={"content-type": "audio/wav"},
        timeout=30,
    )
    assert r.status_code == 200, r.text
    return r.json()


def test_upload_shows_label_spectrogram_and_cam(server: str, page: Page, clip: Path) -> None:
    page.goto(server)
    page.set_input_files("#file", str(clip))
    page.wait_for_selector("#explain-body:not([hidden])", timeout=60_000)
    assert page.inner_text("#top-label") == classify(server, clip)["predictions"][0]["label"]
    assert page.locator("#predictions li").count() == 5
    spectrogram = page.evaluate(CANVAS_STATS, "spectrogram")
    assert (spectrogram["width"], spectrogram["height"]) == (431, 128)
    assert spectrogram["variance"] > 100, spectrogram  # not blank
    cam = page.evaluate(CANVAS_STATS, "cam")
    assert page.is_visible("#cam") and cam["opaque"] > 0, cam
    assert page.inner_text("#cam-label")
    assert page.locator("#stages .stage").count() == 3  # stem, stage1, stage2 of the tiny model
    assert page.evaluate(CANVAS_STATS, "waveform")["variance"] > 0
    page.screenshot(path=REPORTS / "page-upload.png", full_page=True)
    page.uncheck("#show-cam")
    assert not page.is_visible("#cam")


DROP = """([name, b64]) => {
  const bytes = Uint8Array.from(atob(b64), (c) => c.charCodeAt(0));
  const dt = new DataTransfer();
  dt.items.add(new File([bytes], name, { type: "audio/wav" }));
  return dt;
}"""


def test_dropped_long_file_has_a_timeline_and_a_cursor(server: str, page: Page, clip: Path) -> None:
    x, sr = sf.read(clip, dtype="float32")
    long = clip.with_name("long.wav")
    sf.write(long, np.tile(x, 3)[: 12 * sr], sr, subtype="PCM_16")  # 12 s: 4 windows
    page.goto(server)
    data = page.evaluate_handle(DROP, ["long.wav", base64.b64encode(long.read_bytes()).decode()])
    page.dispatch_event("#drop", "drop", {"dataTransfer": data})
    page.wait_for_selector("#explain-body:not([hidden])", timeout=60_000)
    buttons = page.locator("#timeline button")
    assert buttons.count() == 4
    buttons.nth(2).click()
    assert buttons.nth(2).get_attribute("aria-pressed") == "true"
    assert "5.0–10.0 s" in page.inner_text("#spectro-title")
    page.evaluate("document.getElementById('player').currentTime = 6.5")
    page.wait_for_selector("#cursor:not([hidden])")
    left = page.evaluate("parseFloat(document.getElementById('cursor').style.left)")
    assert left == pytest.approx(30, abs=1)  # 1.5 s into the 5 s window on show
    page.screenshot(path=REPORTS / "page-long.png", full_page=True)


def test_fake_microphone_recording(server: str, page: Page) -> None:
    page.goto(server)
    page.click("#record")
    page.wait_for_selector("#record[aria-pressed=true]")
    page.wait_for_timeout(2500)  # Chrome plays the clip into the fake microphone
    page.click("#record")
    page.wait_for_selector("#result:not([hidden])", timeout=60_000)
    assert page.inner_text("#top-label")
    assert "WAV" in page.inner_text("#meta")  # recorded WebM/Opus, decoded and sent as WAV
    page.wait_for_selector("#explain-body:not([hidden])", timeout=60_000)
    page.screenshot(path=REPORTS / "page-microphone.png", full_page=True)


def test_garbage_file_shows_the_error(server: str, page: Page, tmp_path: Path) -> None:
    junk = tmp_path / "notes.wav"
    junk.write_bytes(b"this is not audio\n" * 64)
    page.goto(server)
    page.set_input_files("#file", str(junk))
    page.wait_for_selector("#error:not([hidden])", timeout=30_000)
    text = page.inner_text("#error")
    assert "Could not classify" in text and "HTTP 415" in text and "supported" in text
    assert page.is_hidden("#result") and page.is_hidden("#explain")
    page.screenshot(path=REPORTS / "page-error.png", full_page=True)


def test_phone_width_and_labelled_controls(server: str, browser: Browser, clip: Path) -> None:
    context = browser.new_context(viewport={"width": 380, "height": 800}, is_mobile=True)
    page = context.new_page()
    page.goto(server)
    unlabelled = page.evaluate("""() => [...document.querySelectorAll("input, button")]
        .filter((el) => !(el.labels && el.labels.length) && !el.getAttribute("aria-label")
                        && !el.textContent.trim()).map((el) => el.id)""")
    assert unlabelled == []
    visited = []  # by keyboard alone: the file chooser and the record button are reachable
    for _ in range(4):
        page.keyboard.press("Tab")
        visited.append(page.evaluate("document.activeElement.id || document.activeElement.tagName"))
    assert visited[:3] == ["A", "file", "record"], visited
    page.set_input_files("#file", str(clip))
    page.wait_for_selector("#explain-body:not([hidden])", timeout=60_000)
    assert page.evaluate("document.documentElement.scrollWidth") <= 380  # no sideways scroll
    page.screenshot(path=REPORTS / "page-phone.png", full_page=True)
    context.close()


def test_without_explain_artifact_the_page_still_classifies(
    tiny_onnx: Path, page: Page, clip: Path, tmp_path: Path
) -> None:
    settings = Settings(
        model_path=tiny_onnx, explain_model_path=tmp_path / "absent.onnx", intra_op_threads=1
    )
    with serve(settings) as base:
        page.goto(base)
        page.set_input_files("#file", str(clip))
        page.wait_for_function(
            "document.getElementById('explain-status').textContent.includes('unavailable')",
            timeout=60_000,
        )
        assert page.inner_text("#top-label")
        assert "make export" in page.inner_text("#explain-status")
        page.screenshot(path=REPORTS / "page-no-explain.png", full_page=True)


def test_docs_render_without_network(server: str, page: Page) -> None:
    requested: list[str] = []
    page.on("request", lambda r: requested.append(r.url))
    page.goto(server + "/docs")
    page.wait_for_selector('[data-path="/v1/explain"]', timeout=30_000)
    assert "ESC-50" in page.inner_text(".swagger-ui .info")
    assert all(u.startswith(server) or u.startswith("data:") for u in requested), requested
    page.screenshot(path=REPORTS / "docs.png")
    assert page.locator(".info a", has_text="The page").get_attribute("href") == "/"


def test_the_page_lists_loaded_versions_and_classifies_with_the_chosen_one(
    tiny_onnx: Path, tiny_int8: Path, page: Page, clip: Path, tmp_path: Path
) -> None:
    """Issue 16: the page offers the repository's loaded models and versions, sends the sound
    to the chosen one, and says which model and version answered."""
    repo = tmp_path / "repo"
    for version, artifact in ((1, tiny_onnx), (2, tiny_int8)):
        (repo / "tiny" / str(version)).mkdir(parents=True)
        shutil.copy(artifact, repo / "tiny" / str(version) / "model.onnx")
    settings = Settings(model_repository=repo, version_policy="all", intra_op_threads=1)
    with serve(settings) as base:
        page.goto(base)
        page.wait_for_selector("#model option[value='tiny/versions/1']", state="attached")
        options = page.eval_on_selector_all("#model option", "os => os.map((o) => o.value)")
        assert options == ["", "tiny", "tiny/versions/1", "tiny/versions/2"]
        page.select_option("#model", "tiny/versions/1")
        with page.expect_response(lambda r: "/classify" in r.url) as answer:
            page.set_input_files("#file", str(clip))
        assert answer.value.url.split("?")[0].endswith("/v1/models/tiny/versions/1/classify")
        page.wait_for_selector("#result:not([hidden])", timeout=60_000)
        assert "model tiny version 1 (fp32)" in page.text_content("#meta")
        page.select_option("#model", "")  # the default: the highest version
        page.set_input_files("#file", [])
        page.set_input_files("#file", str(clip))
        page.wait_for_function(
            "document.getElementById('meta').textContent.includes('version 2')", timeout=60_000
        )
        assert "model tiny version 2 (int8)" in page.text_content("#meta")
