"""Runs the host tests (tests/host/) against the real ComfyUI at COMFYUI_PATH, with its own Python.

They need ComfyUI's interpreter (COMFYUI_PYTHON, default: the current one), so they run in a
subprocess; without COMFYUI_PATH they are skipped with this message.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from helpers import ROOT

COMFYUI_PATH = os.environ.get("COMFYUI_PATH")


@pytest.mark.host
@pytest.mark.skipif(not COMFYUI_PATH, reason="host tests need a ComfyUI checkout: set COMFYUI_PATH (and COMFYUI_PYTHON)")
def test_against_real_comfyui() -> None:
    python = os.environ.get("COMFYUI_PYTHON", sys.executable)
    env = dict(os.environ, REALSR_HOST_SUITE="1", PYTHONUNBUFFERED="1")
    proc = subprocess.run([python, "-m", "pytest", "tests/host", "-q", "-p", "no:cacheprovider", "-rs"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=3000)
    sys.stdout.write(proc.stdout[-20000:])
    assert proc.returncode == 0, proc.stdout[-8000:] + proc.stderr[-4000:]
    # A host test that skipped (e.g. scikit-image missing in ComfyUI's Python) did not test the host.
    assert " skipped" not in proc.stdout.strip().splitlines()[-1], proc.stdout[-4000:]
