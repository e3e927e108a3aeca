"""The app in a real browser: Debian's headless Chromium driven by Playwright. Fill the form, see a
field's error next to it, press Train, watch the gallery refresh, reload the page mid-run, stop; the
screenshot goes to docs/images/gradio_app.png for the README.

Not in the default run (about a minute and a half on 2 busy cores). Needs ``apt-get install -y chromium``
and ``pip install -e ".[dev,browser]"``; run with ``python -m pytest -m browser -s``.
"""

import os
import re
import time
from pathlib import Path

import pytest

from test_gradio_app import REPO, launch_app, runs_in

pytestmark = pytest.mark.browser

CHROMIUM = Path(os.environ.get("RLR_CHROMIUM", "/usr/bin/chromium"))
FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--disable-default-apps"]
SHOT = REPO / "docs" / "images" / "gradio_app.png"
DEMO = {  # the default recipe on a shorter chain and smaller batches, so the gallery refreshes often
    "steps": "40", "eval_every": "4", "batch_size": "4", "images_per_prompt": "2", "num_inference_steps": "10",
}


def set_field(page, key: str, value: str) -> None:
    box = page.locator(f"#f-{key} input, #f-{key} textarea").first
    box.fill(value)
    box.press("Tab")


def status_step(page) -> int:
    m = re.search(r"update (\d+) / \d+", page.locator("#rlr-status").inner_text())
    return int(m.group(1)) if m else -1


def test_train_in_a_real_browser(tmp_path):
    from playwright.sync_api import expect, sync_playwright

    assert CHROMIUM.is_file(), f"{CHROMIUM} not found: apt-get install -y chromium (or set RLR_CHROMIUM)"
    with launch_app(tmp_path) as app, sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=FLAGS)
        page = browser.new_page(viewport={"width": 1400, "height": 1050})
        page.goto(app["url"])
        expect(page.locator("#train")).to_be_visible(timeout=60_000)
        page.wait_for_load_state("networkidle")  # the page's load events end (their updates clear field messages)

        # bad input: the message shows next to its field and nothing starts
        set_field(page, "steps", "0")
        page.click("#train")
        expect(page.locator("#f-steps")).to_contain_text("must be >= 1", timeout=20_000)
        time.sleep(1)
        assert runs_in(app["out"]) == set()

        page.get_by_text("Advanced", exact=True).click()
        set_field(page, "prompts", "a red circle on a blue background\na green square on a white background")
        for key, value in DEMO.items():
            set_field(page, key, value)
        t0 = time.monotonic()
        page.click("#train")
        expect(page.locator("#rlr-status")).to_contain_text("first refreshed gallery", timeout=180_000)
        first = time.monotonic() - t0
        expect(page.locator("#gallery")).to_contain_text("vs step 4 (bottom)", timeout=30_000)

        # a reload does not stop the run; the new page shows it
        page.reload()
        expect(page.locator("#rlr-status")).to_contain_text("running", timeout=60_000)
        expect(page.locator("#f-steps input")).to_have_value("40", timeout=20_000)  # the form shows the run's settings
        step = status_step(page)
        shown = "/update (\\d+) \\//.exec(document.querySelector('#rlr-status').innerText)[1]"
        page.wait_for_function(f"() => {shown} > {step}", timeout=60_000)  # still training
        page.wait_for_function(f"() => {shown} >= 24", timeout=240_000)
        rate = page.locator("#rlr-status").inner_text()
        SHOT.parent.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(SHOT), full_page=True)

        page.click("#stop")
        expect(page.locator("#notice")).to_contain_text("stopping after update", timeout=20_000)
        expect(page.locator("#rlr-status")).to_contain_text("stopped", timeout=60_000)
        (run,) = runs_in(app["out"])
        assert (app["out"] / run / "lora.safetensors").is_file()
        total = time.monotonic() - t0
        browser.close()
    print(f"\nfirst refreshed gallery {first:.1f} s after Train; {total:.1f} s from Train to stopped; "
          f"status at the screenshot: {rate!r}; load: {os.getloadavg()}")
