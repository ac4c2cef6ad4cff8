"""Screenshots of the RealSR Extras controls and the StableSR img2img script in a real webui's UI (for the README).

Starts the webui with its UI (not ``--nowebui``) on 127.0.0.1, this repository linked into its ``extensions/``,
and photographs it with Chromium through playwright (``pip install playwright``; Debian's ``chromium``)::

    python docs/make_webui_screenshots.py --webui ~/webui/forge --python ~/webui/venv-forge/bin/python \
        --models DIR_WITH_REALSR_FILES --ckpt-dir DIR_WITH_SD21 [--flags --always-cpu]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def wait(url: str, proc: subprocess.Popen, seconds: int = 300) -> None:
    for _ in range(seconds):
        if proc.poll() is not None:
            raise SystemExit("the webui exited while starting")
        try:
            urllib.request.urlopen(url, timeout=5)
            return
        except OSError:
            time.sleep(1)
    raise SystemExit("the webui did not answer")


def shot(page, first, last, name: str, below: int = 20) -> None:  # noqa: ANN001 - playwright objects
    """The part of the page from ``first`` (top left) down to ``last`` (bottom right)."""
    top, bottom = first.bounding_box(), last.bounding_box()  # viewport coordinates; the clip is in page ones
    scroll = page.evaluate("window.scrollY")
    top["y"] += scroll
    bottom["y"] += scroll
    x, y = top["x"] - 25, top["y"] - 60
    page.screenshot(path=str(ROOT / "docs" / name), full_page=True,
                    clip={"x": x, "y": y, "width": max(b["x"] + b["width"] for b in (top, bottom)) + 25 - x,
                          "height": bottom["y"] + bottom["height"] + below - y})


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--webui", type=Path, required=True)
    p.add_argument("--python", required=True)
    p.add_argument("--models", required=True)
    p.add_argument("--ckpt-dir", required=True)
    p.add_argument("--port", type=int, default=7870)
    p.add_argument("--flags", nargs=argparse.REMAINDER, default=["--always-cpu"])
    p.add_argument("--chromium", default="/usr/bin/chromium")
    a = p.parse_args()
    from playwright.sync_api import sync_playwright

    link = a.webui / "extensions" / "realsr-screenshot"
    link.unlink(missing_ok=True)
    link.symlink_to(ROOT)
    env = {**os.environ, "COMMANDLINE_ARGS": "", "HF_HUB_OFFLINE": "1", "GRADIO_ANALYTICS_ENABLED": "False"}
    proc = subprocess.Popen([a.python, "launch.py", "--skip-prepare-environment", "--skip-install",
                             "--skip-python-version-check", "--skip-torch-cuda-test", "--skip-version-check",
                             "--no-download-sd-model", "--server-name", "127.0.0.1", "--port", str(a.port),
                             "--realsr-models-path", a.models, "--ckpt-dir", a.ckpt_dir, *a.flags],
                            cwd=a.webui, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        url = f"http://127.0.0.1:{a.port}"
        wait(url, proc)
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=a.chromium, args=["--no-sandbox", "--disable-gpu"])
            page = browser.new_page(viewport={"width": 1500, "height": 1100})
            page.goto(url, timeout=180000)
            page.wait_for_selector("#tab_extras", state="attached", timeout=180000)
            time.sleep(3)
            page.get_by_role("tab", name="Extras").click()
            time.sleep(1)
            extras = page.locator("#tab_extras")
            extras.get_by_text("RealSR", exact=True).first.click()
            time.sleep(1)
            extras.get_by_label("Enable RealSR controls").check()
            extras.get_by_label("MM-RealSR blur: auto (the model's estimate)").uncheck()
            time.sleep(1)
            shot(page, extras.get_by_text("Upscaler 1").first, extras.get_by_label("LWay learning rate"), "webui_extras.png")
            page.get_by_role("tab", name="img2img").first.click()
            time.sleep(1)
            tab = page.locator("#tab_img2img")
            script = tab.locator("#script_list input").first
            script.click()
            page.get_by_role("option", name="StableSR", exact=True).click()
            time.sleep(2)
            shot(page, tab.locator("#script_list"), tab.get_by_text("Tiled VAE").last, "webui_stablesr.png", below=80)
            browser.close()
    finally:
        proc.terminate()
        proc.wait(30)
        link.unlink(missing_ok=True)


if __name__ == "__main__":
    main()
