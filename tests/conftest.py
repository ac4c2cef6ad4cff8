"""pytest setup: the tests import ``helpers`` from this folder; tests/host/ runs only under ComfyUI."""

from __future__ import annotations

import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

# tests/host/ needs ComfyUI's interpreter; test_host.py runs it there when COMFYUI_PATH is set.
collect_ignore = [] if os.environ.get("REALSR_HOST_SUITE") else ["host"]
