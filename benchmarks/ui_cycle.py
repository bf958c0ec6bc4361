"""What a user waits for in ``apla-ui``: the whole train-export-generate cycle of the tiny preset,
driven from the page in headless Chromium (Debian's ``chromium`` through Playwright, as
tests/test_ui_browser.py does), with every setting at the page's default.

    python benchmarks/ui_cycle.py [--clip CLIP] [--prompt TEXT] [--edit TEXT] [--minutes 40]
        [--json OUT]

It starts ``apla-ui`` on a temporary workspace (127.0.0.1, stopped by its pid, its jobs too),
uploads the clip (default: ``../shared/data/man-skiing.mp4``, else ``examples/man-skiing.mp4``),
types the prompt and presses "Start training" with the preset's steps, frames and size; then
generates one edit prompt on the new model with the model's own sampling defaults and checks
that the page's ``<video>`` loaded (duration > 0). It times, as seen from the page:

* ``open_s``: the page loading until the Train tab answers;
* ``upload_s``: the upload until the clip is reported readable;
* ``train_s``: "Start training" until the job shows "exporting" (``apla-train``: training, the
  inversion and its sample video);
* ``export_s``: from then until the job is done (``apla-export``, with the DeepCache graphs);
* ``generate_s``: "Generate" until the page says the video is saved, and ``video_s`` until the
  page's ``<video>`` has loaded it;
* ``total_s``: "Start training" until the video has loaded.

Prints one JSON object (and writes it to ``--json``) with the settings the page used and the
machine's ``lscpu`` model and flags.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parents[1]
for folder in (ROOT, ROOT / "tests"):
    if str(folder) not in sys.path:
        sys.path.insert(0, str(folder))

TRAIN_FIELDS = ("steps", "frames", "size")


def default_clip() -> Path:
    shared = ROOT.parent / "shared" / "data" / "man-skiing.mp4"
    return shared if shared.is_file() else ROOT / "examples" / "man-skiing.mp4"


def until(what: str, check: Callable[[], Any], deadline: float) -> Any:
    """Poll ``check`` every quarter second until it returns something true."""
    from ui_helpers import wait_for

    return wait_for(what, check, max(deadline - time.monotonic(), 1.0), every=0.25)


def cycle(page: Any, url: str, clip: Path, prompt: str, edit: str, deadline: float) -> dict[str, Any]:
    from test_ui_browser import pick, wait_text

    def progress() -> str:
        return page.inner_text("#job-progress")

    marks: dict[str, float] = {"start": time.monotonic()}
    page.goto(url)
    page.wait_for_selector("#start-training", timeout=120_000)
    marks["opened"] = time.monotonic()
    page.set_input_files("#clip-upload input[type=file]", str(clip))
    wait_text(page, "#clip-message", "can be read|rror", 120)
    marks["uploaded"] = time.monotonic()
    page.fill("#train-prompt textarea", prompt)
    settings = {f: page.input_value(f"#train-{f} input") for f in TRAIN_FIELDS}
    name = page.input_value("#train-name textarea")  # the model's name: the clip's, by default
    page.click("#start-training")
    marks["train"] = time.monotonic()
    until("the job to export", lambda: re.search(r"\[(exporting|done|failed|interrupted|cancelled)\]",
                                                 progress()), deadline)
    marks["export"] = time.monotonic()
    state = until("the job to end", lambda: re.search(r"\[(done|failed|interrupted|cancelled)\]",
                                                      progress()), deadline).group(1)
    marks["done"] = time.monotonic()
    if state != "done":
        raise SystemExit(f"error: the training job ended {state}: {progress()}")

    page.click("#tab-generate-button")
    pick(page, "#gen-model", name)
    wait_text(page, "#model-info", "training prompt", 60)
    page.fill("#gen-prompts textarea", edit)
    page.fill("#gen-seeds textarea", "1")
    page.click("#generate-button")
    marks["generate"] = time.monotonic()
    message = wait_text(page, "#gen-message", "saved as|rror", max(deadline - time.monotonic(), 1))
    marks["saved"] = time.monotonic()
    if "saved as" not in message:
        raise SystemExit(f"error: generating failed: {message}")
    page.wait_for_function("[...document.querySelectorAll('.result-video video')].some(v => v.readyState >= 1)",
                           timeout=60_000)
    marks["loaded"] = time.monotonic()
    shown = page.evaluate("[...document.querySelectorAll('.result-video video')]"
                          ".map(v => ({duration: v.duration, width: v.videoWidth}))")
    if not shown or not shown[0]["duration"] > 0:
        raise SystemExit(f"error: the page's video did not load: {shown}")

    def between(a: str, b: str) -> float:
        return round(marks[b] - marks[a], 1)

    return {"settings": {**settings, "name": name, "prompt": prompt, "edit": edit},
            "video": shown[0], "message": message.strip()[:200],
            "seconds": {"open_s": between("start", "opened"), "upload_s": between("opened", "uploaded"),
                        "train_s": between("train", "export"), "export_s": between("export", "done"),
                        "generate_s": between("generate", "saved"), "video_s": between("generate", "loaded"),
                        "total_s": between("train", "loaded")}}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--clip", type=Path, default=None, help="training clip (default: man-skiing.mp4)")
    p.add_argument("--prompt", default="a man is skiing", help="the clip's prompt")
    p.add_argument("--edit", default="a panda is skiing", help="the prompt generated afterwards")
    p.add_argument("--minutes", type=float, default=40.0, help="give up after this long")
    p.add_argument("--json", type=Path, default=None, help="also write the result here")
    args = p.parse_args(argv)
    clip = args.clip or default_clip()
    if not clip.is_file():
        raise SystemExit(f"error: no clip at {clip}")

    from benchmarks.cpu_backends import lscpu
    from test_ui_browser import CHROMIUM, CHROMIUM_ARGS
    from ui_helpers import UIServer

    if not CHROMIUM.is_file():
        raise SystemExit(f"error: no {CHROMIUM}: install Debian's chromium package")
    from playwright.sync_api import sync_playwright

    deadline = time.monotonic() + args.minutes * 60
    with tempfile.TemporaryDirectory(prefix="apla-ui-cycle-") as tmp:
        server = UIServer(Path(tmp) / "workspace", Path(tmp) / "server.log", max_upload_mb=200.0)
        try:
            server.start()
            with sync_playwright() as pw:
                browser = pw.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, headless=True)
                try:
                    page = browser.new_page(viewport={"width": 1200, "height": 860})
                    result = cycle(page, server.url, clip, args.prompt, args.edit, deadline)
                except AssertionError as err:  # a wait timed out
                    raise SystemExit(f"error: {err}") from None
                finally:
                    browser.close()
        finally:
            server.close()
    result = {"clip": clip.name, **result, "lscpu": lscpu(),
              "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")}
    text = json.dumps(result, indent=1)
    print(text)
    if args.json:
        args.json.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
