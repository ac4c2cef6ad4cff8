"""Real ComfyUI for the host tests (fixtures re-exported by tests/host/conftest.py): imported from COMFYUI_PATH, CPU mode, the pack loaded by ComfyUI itself.

Fixture weights are written under the official file names into a temporary model folder that is
registered the way ``extra_model_paths.yaml`` registers folders.
"""

from __future__ import annotations

import asyncio
import os
import sys
from pathlib import Path

import pytest
import torch
from helpers import ROOT, fixture_state_dict, make_weights

COMFYUI_PATH = os.environ.get("COMFYUI_PATH")
if not COMFYUI_PATH:
    pytest.skip("host tests need a ComfyUI checkout: set COMFYUI_PATH", allow_module_level=True)

# Official file name -> fixture, as the shipped workflows name them.
OFFICIAL_FILES = {
    "FeMaSR_SRX4_model_g.pth": "femasr_x4",
    "FeMaSR_SRX2_model_g.pth": "femasr_x2",
    "MMRealSRGAN.pth": "mmrealsr_x4",
}


def write_model_files(folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for name, fixture in OFFICIAL_FILES.items():
        if not (folder / name).exists():
            man = make_weights.load_manifest(str(ROOT / "tests" / "fixtures" / fixture / "manifest.json"))
            make_weights.save_checkpoint(fixture_state_dict(fixture), str(folder / name), man["wrapper"])


@pytest.fixture(scope="session")
def models_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("models") / "realsr"
    write_model_files(folder)
    return folder


@pytest.fixture(scope="session")
def comfy(models_dir: Path):
    """ComfyUI's modules with our pack loaded through its own custom-node loader."""
    sys.path.insert(0, COMFYUI_PATH)
    from comfy.cli_args import args

    args.cpu = True  # before comfy.model_management is imported
    import folder_paths

    folder_paths.add_model_folder_path("realsr", str(models_dir))  # as extra_model_paths.yaml does
    import nodes as comfy_nodes

    ok = asyncio.run(comfy_nodes.load_custom_node(str(ROOT)))
    assert ok, "ComfyUI could not load the pack (see the log above)"
    import comfy.model_management as mm
    import comfy.utils

    class Host:
        nodes = comfy_nodes.NODE_CLASS_MAPPINGS
        model_management = mm
        utils = comfy.utils

    yield Host
    comfy.utils.set_progress_bar_global_hook(None)


def bhwc(x: torch.Tensor) -> torch.Tensor:
    """NCHW -> ComfyUI IMAGE [B, H, W, C]."""
    return x.permute(0, 2, 3, 1).contiguous()


def cancel_on_first_tick(mm, ticks: list[int]):
    """A progress hook that records each tick and presses Cancel (as the UI does) at the first one."""

    def hook(value, total, preview, node_id=None):
        ticks.append(value)
        if len(ticks) == 1:
            mm.interrupt_current_processing(True)

    return hook
