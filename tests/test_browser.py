"""The live demo in a real browser: `python -m helpers serve` on 127.0.0.1, driven by headless
Debian Chromium through playwright. Upload a photo → K result images with item ids, for the whole
photo; drag a box on it with the mouse → the results of that box (as the Python handler gives them
for the same pixels), not of the whole photo; pick a test query → its annotated box is searched;
upload a corrupt file → the error message, no results; a good photo again → results again.

`.ci/run` installs Debian's chromium when it is missing, so in CI this test runs; it skips only
where /usr/bin/chromium is absent (say, a laptop without it).
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from app_support import fixture_index
from PIL import Image

from helpers.apps import app
from helpers.core import config
from helpers.core.runtime import CHROMIUM, CHROMIUM_ARGS

SCREENSHOTS = config.OUTPUTS / "browser"
K = 4

pytestmark = pytest.mark.skipif(
    not os.access(CHROMIUM, os.X_OK),
    reason=f"{CHROMIUM} not found: install Debian's chromium (apt-get install chromium)",
)


def _wait_until_up(url: str, server: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise AssertionError(f"the server exited with {server.returncode}: {server.stdout.read()}")
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except OSError:
            time.sleep(0.5)
    raise AssertionError(f"{url} did not answer within {timeout} s")


@pytest.fixture(scope="module")
def served(tmp_path_factory, free_port):
    index_dir = fixture_index(tmp_path_factory)
    port = free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "helpers", "serve", "--index", str(index_dir), "--port", str(port)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    url = f"http://127.0.0.1:{port}/"
    try:
        _wait_until_up(url, server)
        yield url, index_dir
    finally:
        server.terminate()
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            server.kill()


def _upload(page, upload: Path) -> None:
    """Upload a file and return once the server has it: the box-drawing component, unlike gr.Image,
    does not hold Search back while its upload is still on the way."""
    with page.expect_response(lambda response: "/upload" in response.url and response.request.method == "POST"):
        page.locator("#query-image input[type=file]").set_input_files(str(upload))


def _search(page, upload: Path, size: tuple[int, int]) -> None:
    """Upload a photo of ``size`` and press Search once the page shows it."""
    _upload(page, upload)
    _wait_until_shown(page, size)
    page.click("#search")


def _wait_until_shown(page, size: tuple[int, int]) -> None:
    """Until the photo is drawn: the canvas takes the photo's height at the width it is shown
    (shrunk to the canvas width, never enlarged)."""
    page.wait_for_function(
        """([w, h]) => { const c = document.querySelector('#query-image canvas');
            return c !== null && c.width > 0 && Math.abs(c.height - Math.round(h * Math.min(1, c.width / w))) <= 1; }""",
        arg=list(size),
        timeout=60_000,
    )


def _drag_box(page, size: tuple[int, int], box: tuple[float, float, float, float]) -> tuple[int, ...]:
    """Drag a box with the mouse over ``box`` (fractions of the photo, x1 y1 x2 y2) on the shown
    photo; returns the photo's pixels under the two mouse positions, as the page must read them."""
    rect = page.locator("#query-image canvas").bounding_box()
    width, height = size
    scale = rect["height"] / height  # screen px per photo px; the photo is centred across
    left, top = rect["x"] + (rect["width"] - width * scale) / 2, rect["y"]
    x1, y1 = round(left + box[0] * width * scale), round(top + box[1] * height * scale)
    x2, y2 = round(left + box[2] * width * scale), round(top + box[3] * height * scale)
    page.mouse.move(x1, y1)
    page.mouse.down()
    page.mouse.move((x1 + x2) / 2, (y1 + y2) / 2, steps=5)
    page.mouse.move(x2, y2, steps=5)
    page.mouse.up()
    return round((x1 - left) / scale), round((y1 - top) / scale), round((x2 - left) / scale), round((y2 - top) / scale)


def test_upload_box_search_error_and_recovery_in_a_real_browser(served, tmp_path):
    from playwright.sync_api import expect, sync_playwright

    url, index_dir = served
    root = config.get_config("fixture").work_dir / "data"
    photo = next(iter(sorted(root.glob("img/*/*/*/comsumer_*.jpg"))))
    with Image.open(photo) as image:
        size = image.size  # no EXIF turn in the generated photos: these are the upright pixels
    corrupt = tmp_path / "broken.jpg"
    corrupt.write_bytes(photo.read_bytes()[:200])  # a JPEG cut off after its header
    demo = app.load_app(str(index_dir))  # the same index in this process: the Python handler's answer
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            page.goto(url, timeout=60_000)
            expect(page.locator("#box-advice")).to_contain_text("Drag a box around the garment")
            page.locator("#k input[type=number]").fill(str(K))
            page.locator("#k input[type=number]").press("Enter")
            items = page.locator("#results .gallery-item")
            captions = page.locator("#results .caption-label")

            _search(page, photo, size)
            expect(page.locator("#status")).to_contain_text(f"top {K} shop images for the whole photo", timeout=60_000)
            expect(items).to_have_count(K)
            expect(page.locator("#results .gallery-item img")).to_have_count(K)
            whole = captions.all_inner_texts()
            assert len(whole) == K and all(" id_" in text for text in whole), whole

            box = _drag_box(page, size, (0.2, 0.15, 0.75, 0.7))
            page.click("#search")
            expect(page.locator("#status")).to_contain_text(
                f"top {K} shop images for the box {','.join(map(str, box))}", timeout=60_000
            )
            drawn = captions.all_inner_texts()
            handler = demo.answer(photo.read_bytes(), box=box, k=K)
            assert drawn == [app.caption(hit) for hit in handler.hits], (drawn, box)
            assert drawn != whole
            page.screenshot(path=str(SCREENSHOTS / "app_results.jpg"), type="jpeg", quality=70, full_page=True)

            label = demo.query_choices()[0]
            row = demo.queries[label]
            page.locator("#test-query input").click()
            page.get_by_role("option", name=label).click()
            expect(page.locator("#status")).to_have_text("")  # the pick's answer is in: its photo and box shown
            page.click("#search")
            expect(page.locator("#status")).to_contain_text(f"true item {row.item_id} found at rank", timeout=60_000)
            expect(page.locator("#status")).to_contain_text(f"for the box {row.x_1},{row.y_1},{row.x_2},{row.y_2}")

            _upload(page, corrupt)  # it cannot be shown; the upload forgets the test query
            expect(page.locator("#test-query input")).to_have_value("")
            page.click("#search")
            expect(page.locator("#status")).to_contain_text("truncated or corrupt", timeout=60_000)
            expect(items).to_have_count(0)
            page.screenshot(path=str(SCREENSHOTS / "app_error.jpg"), type="jpeg", quality=70, full_page=True)

            _search(page, photo, size)  # a new photo starts without a box (and without the test query)
            expect(page.locator("#status")).to_contain_text(f"top {K} shop images for the whole photo", timeout=60_000)
            expect(items).to_have_count(K)
            assert captions.all_inner_texts() == whole
        finally:
            browser.close()
    assert (SCREENSHOTS / "app_results.jpg").stat().st_size > 10_000  # a page was rendered, not a blank
