"""Screenshot of a shipped workflow in the real ComfyUI frontend (for the README).

Needs COMFYUI_PATH, a Python that runs ComfyUI with `playwright` installed, and Chromium::

    COMFYUI_PATH=~/ComfyUI $COMFYUI_PYTHON docs/make_screenshot.py workflows/femasr_x4_colorfix.json docs/workflow_femasr.png
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "tests"), str(ROOT / "tests" / "host")]


def main(workflow: str, out: str, chromium: str = "/usr/bin/chromium") -> None:
    from playwright.sync_api import sync_playwright
    from test_server import Server

    srv = Server(Path(tempfile.mkdtemp(prefix="realsr_shot_")))
    srv.start()
    try:
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=chromium, args=["--no-sandbox", "--disable-gpu"])
            page = browser.new_page(viewport={"width": 1700, "height": 760})
            page.goto(srv.url)
            page.wait_for_function("window.app && window.app.graph", timeout=120000)
            time.sleep(3)
            for _ in range(3):  # the template browser and toasts of a first start
                page.keyboard.press("Escape")
                time.sleep(0.5)
            page.evaluate("wf => window.app.loadGraphData(wf)", json.loads(Path(workflow).read_text()))
            time.sleep(3)
            page.keyboard.press("Escape")
            page.screenshot(path=out)
            browser.close()
    finally:
        srv.stop()


if __name__ == "__main__":
    main(*sys.argv[1:])
