"""05_live_demo/screenshot.jpg: the live demo serving the demo model, answering a real test query.

Run after `04_demo` (it builds the index and writes the per-query ranks this picks from):

    .venv/bin/python 05_live_demo/take_screenshot.py            # profile demo
    .venv/bin/python 05_live_demo/take_screenshot.py --profile full

The query is the test query `04_demo` answered best (``final.pick_examples``), never picked by
hand; it arrives with its annotated box drawn, as a shopper's drag would give it. Needs Chromium
(Debian's ``/usr/bin/chromium``, driven by playwright).
"""

from __future__ import annotations

import argparse
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pandas as pd

from helpers.core import config
from helpers.core.files import REPO_ROOT, portable_path
from helpers.core.runtime import CHROMIUM, CHROMIUM_ARGS
from helpers.experiments import final


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def wait_until_up(url: str, server: subprocess.Popen, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.poll() is not None:
            sys.exit(f"the server exited with {server.returncode}")
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except OSError:
            time.sleep(0.5)
    sys.exit(f"{url} did not answer within {timeout} s")


def main() -> None:
    from playwright.sync_api import expect, sync_playwright

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--profile", default="demo", choices=sorted(config.PROFILES))
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "05_live_demo" / "screenshot.jpg")
    args = parser.parse_args()
    cfg = config.PROFILES[args.profile]  # only where its outputs live: no data is read here
    index_dir, ranks = cfg.work_dir / "final_index", final.out_dir(cfg) / "per_query_ranks.csv"
    for needed in (index_dir, ranks):
        if not needed.exists():
            sys.exit(f"{needed}: missing; run 04_demo on profile {args.profile} first")
    best = final.pick_examples(pd.read_csv(ranks), 1)[0].iloc[0]
    port = free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "helpers", "serve", "--index", str(index_dir), "--port", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_until_up(f"http://127.0.0.1:{port}/", server)
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
            page = browser.new_page(viewport={"width": 1280, "height": 1000})
            page.goto(f"http://127.0.0.1:{port}/", timeout=60_000)
            page.locator("#test-query input").click()
            option = page.get_by_role("option").filter(has_text=Path(best.path).name).filter(has_text=best.item_id)
            option.first.click()
            expect(page.locator("#status")).to_have_text("", timeout=60_000)  # the pick is in: photo and box shown
            page.click("#search")
            expect(page.locator("#status")).to_contain_text("found at rank", timeout=60_000)
            page.wait_for_function(  # every result thumbnail loaded, not only its frame
                """() => { const shown = [...document.querySelectorAll('#results img')];
                    return shown.length > 0 && shown.every(i => i.complete && i.naturalWidth > 0); }""",
                timeout=60_000,
            )
            page.screenshot(path=str(args.out), type="jpeg", quality=80, full_page=True)
            browser.close()
    finally:
        server.terminate()
        server.wait(timeout=30)
    print(f"wrote {portable_path(args.out)}: test query {best.item_id} ({best.path})")


if __name__ == "__main__":
    main()
