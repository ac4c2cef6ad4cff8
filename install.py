"""Install the pack's Python requirements into the running interpreter (ComfyUI-Manager runs this).

Idempotent and offline when nothing is missing: each line of requirements.txt is checked against
what is installed, and pip is called only for the missing or too-old ones.  torch is never
installed or upgraded here: ComfyUI's own torch is used.
"""

from __future__ import annotations

import re
import subprocess
import sys
from importlib import metadata
from pathlib import Path

REQUIREMENTS = Path(__file__).resolve().parent / "requirements.txt"
NEVER = {"torch", "torchvision", "torchaudio"}


def _version_tuple(v: str) -> tuple[int, ...]:
    return tuple(int(p) for p in re.findall(r"\d+", v)[:3])


def missing_requirements(path: Path = REQUIREMENTS) -> list[str]:
    """Requirement lines (``name>=x.y`` or ``name``) not satisfied by the running interpreter."""
    missing = []
    for raw in path.read_text().splitlines():
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        m = re.match(r"^([A-Za-z0-9_.\-]+)\s*(?:>=\s*([\w.]+))?\s*$", line)
        if not m:
            missing.append(line)  # a form we do not check: let pip decide
            continue
        name, minimum = m.group(1), m.group(2)
        if name.lower() in NEVER:
            continue
        try:
            have = metadata.version(name)
        except metadata.PackageNotFoundError:
            missing.append(line)
            continue
        if minimum and _version_tuple(have) < _version_tuple(minimum):
            missing.append(line)
    return missing


def main() -> int:
    todo = missing_requirements()
    if not todo:
        print("realsr: all requirements are installed")
        return 0
    print(f"realsr: installing {', '.join(todo)}")
    return subprocess.call([sys.executable, "-m", "pip", "install", *todo])


if __name__ == "__main__":
    sys.exit(main())
