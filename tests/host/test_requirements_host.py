"""A missing requirement fails the pack's import in ComfyUI's own loader, naming the package and the install command."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

from comfy_host import COMFYUI_PATH
from helpers import ROOT

MISSING = "realsr-missing-test-package>=1"  # a distribution that is truly not installed
LOAD = """
import asyncio, sys
from comfy.cli_args import args
args.cpu = True
import nodes
for pack in sys.argv[1:]:
    print("LOADED", pack, asyncio.run(nodes.load_custom_node(pack)), flush=True)
"""


def test_missing_requirement_fails_the_import_naming_it_and_the_pip_command(tmp_path: Path) -> None:
    packs = []
    for name, extra in (("realsr_ok", ""), ("realsr_missing", MISSING + "\n")):
        pack = tmp_path / "custom_nodes" / name
        shutil.copytree(ROOT, pack, ignore=shutil.ignore_patterns(".*", "__pycache__", "tests", "bench", "docs",
                                                                  "workflows", "*.egg-info"))
        (pack / "requirements.txt").write_text((ROOT / "requirements.txt").read_text() + extra)
        packs.append(str(pack))
    python = os.environ.get("COMFYUI_PYTHON", sys.executable)
    done = subprocess.run([python, "-c", LOAD, *packs], cwd=COMFYUI_PATH, capture_output=True, text=True, timeout=300)
    log = done.stdout + done.stderr
    assert done.returncode == 0, log[-4000:]
    assert f"LOADED {packs[0]} True" in log, log[-4000:]  # the same copy with the real requirements loads
    assert f"LOADED {packs[1]} False" in log, log[-4000:]
    assert "ImportError: RealSR nodes: missing Python package(s)" in log and MISSING in log, log[-4000:]
    assert f'"{python}" -m pip install "{MISSING}"' in log, log[-4000:]
    assert f"install.py  in {packs[1]}" in log, log[-4000:]
    assert "numpy" not in log.split("missing Python package(s)", 1)[1].split("\n", 1)[0]  # only what is missing
