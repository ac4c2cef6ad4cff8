"""pytest setup: the tests import ``helpers`` from this folder; tests/host/ runs only under ComfyUI."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

# tests/host/ needs ComfyUI's interpreter; test_host.py runs it there when COMFYUI_PATH is set.
collect_ignore = [] if os.environ.get("REALSR_HOST_SUITE") else ["host"]


@pytest.fixture(scope="module")
def one_thread() -> Iterator[None]:
    """One intra-op thread for a module of many small convolutions: on the shared 2-core machine a second
    thread mostly waits (modules opt in with ``pytestmark = pytest.mark.usefixtures("one_thread")``)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small MM-RealSR x4 (random weights, official layout) saved as BasicSR writes it: fast CLI runs."""
    from realsr_core.models.mmrealsr import MMRealSRNet

    torch.manual_seed(0)
    net = MMRealSRNet(num_feat=16, num_block=1, num_grow_ch=8, embed_dim=32,
                      de_num_feats=(16, 32), de_num_blocks=(1, 1), de_downscales=(2, 1), de_hidden_dim=32)
    path = tmp_path_factory.mktemp("ckpt") / "small_mmrealsr.pth"
    torch.save({"params": net.state_dict()}, path)
    return path
