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
