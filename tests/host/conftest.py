"""Host-test fixtures (see comfy_host.py)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from comfy_host import comfy, models_dir  # noqa: E402, F401
