"""Models shipped inside the package (trained by this project; see each model's card beside it)."""

from __future__ import annotations

from pathlib import Path

WEIGHTS_DIR = Path(__file__).resolve().parent
DEFAULT_MODEL = "crlsr_x4.safetensors"


def builtin_models() -> list[str]:
    """File names of the shipped models (``*.safetensors`` in this folder)."""
    return sorted(p.name for p in WEIGHTS_DIR.glob("*.safetensors"))


def builtin_path(name: str = DEFAULT_MODEL) -> Path:
    """Path of a shipped model; raises FileNotFoundError naming what is shipped."""
    path = WEIGHTS_DIR / name
    if not path.is_file():
        raise FileNotFoundError(f"no shipped model {name!r} in {WEIGHTS_DIR}; shipped: {builtin_models() or 'none'}")
    return path
