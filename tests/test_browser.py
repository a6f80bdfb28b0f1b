"""The live demo in a real browser: `python -m helpers serve` on 127.0.0.1, driven by headless
Debian Chromium through playwright. Upload a photo → K result images with item ids; upload a
corrupt file → the error message, no results; a good photo again → results again.

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

from helpers.core import config

CHROMIUM = "/usr/bin/chromium"
# Without these, Chromium tries to reach Google's services at start; on a closed network it
# stalls on them (and a root user needs --no-sandbox).
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
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


def _search(page, upload: Path) -> None:
    page.locator("#query-image input[type=file]").set_input_files(str(upload))
    page.click("#search")


def test_upload_search_error_and_recovery_in_a_real_browser(served, tmp_path):
    from playwright.sync_api import expect, sync_playwright

    url, index_dir = served
    root = config.get_config("fixture").work_dir / "data"
    photo = next(iter(sorted(root.glob("img/*/*/*/comsumer_*.jpg"))))
    corrupt = tmp_path / "broken.jpg"
    corrupt.write_bytes(photo.read_bytes()[:200])  # a JPEG cut off after its header
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            page.goto(url, timeout=60_000)
            page.locator("#k input[type=number]").fill(str(K))
            page.locator("#k input[type=number]").press("Enter")

            _search(page, photo)
            items = page.locator("#results .gallery-item")
            expect(items).to_have_count(K, timeout=60_000)
            expect(page.locator("#results .gallery-item img")).to_have_count(K)
            captions = page.locator("#results .caption-label").all_inner_texts()
            assert len(captions) == K and all(" id_" in text for text in captions), captions
            expect(page.locator("#status")).to_contain_text(f"top {K} shop images")
            page.screenshot(path=str(SCREENSHOTS / "app_results.jpg"), type="jpeg", quality=70, full_page=True)

            _search(page, corrupt)
            expect(page.locator("#status")).to_contain_text("truncated or corrupt", timeout=60_000)
            expect(items).to_have_count(0)
            page.screenshot(path=str(SCREENSHOTS / "app_error.jpg"), type="jpeg", quality=70, full_page=True)

            _search(page, photo)
            expect(items).to_have_count(K, timeout=60_000)
            expect(page.locator("#status")).to_contain_text(f"top {K} shop images")
        finally:
            browser.close()
    assert (SCREENSHOTS / "app_results.jpg").stat().st_size > 10_000  # a page was rendered, not a blank
