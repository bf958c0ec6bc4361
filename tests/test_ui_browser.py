"""apla-ui in a real browser: headless Chromium (Debian's ``chromium`` package; .ci/run installs
it, nothing is downloaded) driven through Playwright's Python bindings. Uploads a clip,
starts a short training, reloads the page while it trains and sees its progress again,
waits for the export, generates two prompts and checks that the page's ``<video>`` elements
loaded playable videos (duration > 0, ``videoWidth`` the frames' width). Saves a screenshot
of each tab: into docs/ui/ (which docs/ui.md shows) when pytest runs with ``--ui-screenshots``,
else into the test's temporary folder, so a plain test run leaves the checkout as it was."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from ui_helpers import ROOT, TINY_TRAIN, UIServer

pytestmark = pytest.mark.slow
CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
SCREENSHOTS = ROOT / "docs" / "ui"
PROMPTS = ["a man is skiing", "a panda is skiing"]


@pytest.fixture
def server(tmp_path):
    srv = UIServer(tmp_path / "workspace", tmp_path / "server.log")
    try:
        yield srv.start()
    finally:
        srv.close()


@pytest.fixture
def page():
    if not CHROMIUM.is_file():
        pytest.skip(f"no {CHROMIUM}: install Debian's chromium package (.ci/run does)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, headless=True)
        try:
            yield browser.new_page(viewport={"width": 1200, "height": 860})
        finally:
            browser.close()


def text_of(page, selector: str) -> str:
    return page.inner_text(selector)


def wait_text(page, selector: str, pattern: str, timeout_s: float) -> str:
    """Wait until ``selector``'s text matches the regular expression ``pattern``."""
    page.wait_for_function("([sel, pat]) => { const e = document.querySelector(sel); "
                           "return e && new RegExp(pat).test(e.innerText); }",
                           arg=[selector, pattern], timeout=timeout_s * 1000, polling=250)
    return text_of(page, selector)


def pick(page, dropdown: str, option: str | re.Pattern) -> None:
    page.click(f"{dropdown} input")
    page.get_by_role("option", name=option, exact=isinstance(option, str)).click()


@pytest.fixture
def shots(request, tmp_path) -> Path:
    return SCREENSHOTS if request.config.getoption("--ui-screenshots") else tmp_path / "screenshots"


def shoot(page, name: str, folder: Path) -> None:
    """A small PNG of the whole page (256 colours) in ``folder``."""
    from PIL import Image

    page.mouse.move(0, 0)
    page.wait_for_timeout(600)  # a closing dropdown's animation ends

    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.png"
    page.screenshot(path=str(path), full_page=True)
    with Image.open(path) as im:
        small = im.convert("RGB").quantize(colors=256)
    small.save(path, optimize=True)


def test_upload_train_reload_generate_in_a_browser(server, page, skiing, shots):
    page.goto(server.url)
    page.wait_for_selector("#start-training", timeout=60_000)

    # upload, settings, start
    page.set_input_files("#clip-upload input[type=file]", str(skiing))
    wait_text(page, "#clip-message", "can be read", 60)
    assert page.input_value("#train-name textarea") == "man-skiing"
    page.fill("#train-prompt textarea", "a man is skiing")
    for field in ("steps", "frames", "size"):
        page.fill(f"#train-{field} input", str(TINY_TRAIN[field]))
    page.get_by_text("Advanced", exact=True).click()
    page.fill("#train-advanced textarea", TINY_TRAIN["advanced"])
    page.uncheck("#train-cache-graphs input")
    page.click("#start-training")
    assert "queued" in wait_text(page, "#train-message", "queued|Error", 60)

    # reload while it trains: the progress is shown again
    before = wait_text(page, "#job-progress", r"\[training\]", 120)
    assert "Job 0001" in before and "man-skiing" in before
    shoot(page, "train", shots)
    page.reload()
    page.wait_for_selector("#start-training", timeout=60_000)
    again = wait_text(page, "#job-progress", r"Job 0001 .*\[(training|exporting)\]", 30)
    assert re.search(r"training: step \d+ / 4|exporting the engine folder", again), again
    assert page.query_selector("#job-progress progress") is not None

    done = wait_text(page, "#job-progress", r"\[(done|failed|interrupted|cancelled)\]", 400)
    assert "[done]" in done, done + "\n" + (server.workspace / "jobs" / "0001.log").read_text()[-2000:]

    page.click("#tab-jobs-button")
    wait_text(page, "#jobs-table", "runs/man-skiing -> engines/man-skiing", 30)
    pick(page, "#pick-job", re.compile(r"^0001 man-skiing"))
    page.wait_for_function("document.querySelector('#job-log textarea').value.includes('engine folder written')",
                           timeout=30_000)
    shoot(page, "jobs", shots)

    # generate two prompts on the new model; the page's videos play
    page.click("#tab-generate-button")
    pick(page, "#gen-model", "man-skiing")
    wait_text(page, "#model-info", "training prompt", 60)
    page.fill("#gen-prompts textarea", "\n".join(PROMPTS))
    page.fill("#gen-seeds textarea", "7")
    page.click("#generate-button")
    message = wait_text(page, "#gen-message", "saved as|Error", 120)
    assert "2 videos" in message, message
    page.wait_for_function("document.querySelectorAll('.result-video video').length == 2 && "
                           "[...document.querySelectorAll('.result-video video')].every(v => v.readyState >= 1)",
                           timeout=60_000)
    loaded = page.evaluate("[...document.querySelectorAll('.result-video video')]"
                           ".map(v => ({duration: v.duration, width: v.videoWidth, height: v.videoHeight}))")
    result = json.loads((server.workspace / "videos" / "generated" / "man-skiing" / "0001" /
                         "result.json").read_text())
    assert [v["prompt"] for v in result["videos"]] == PROMPTS
    for shown, video in zip(loaded, result["videos"]):
        assert shown["duration"] > 0 and shown["duration"] == pytest.approx(video["duration_s"], abs=0.2)
        assert (shown["width"], shown["height"]) == (video["width"], video["height"]) == (32, 32)
    shoot(page, "generate", shots)

    page.click("#tab-gallery-button")
    pick(page, "#gallery-model", "man-skiing")
    page.wait_for_function("[...document.querySelectorAll('#tab-gallery video')].length == 2", timeout=30_000)
    shoot(page, "gallery", shots)
