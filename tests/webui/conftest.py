"""Webui host-test fixtures (see webui_host.py)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from webui_host import webui  # noqa: E402, F401
