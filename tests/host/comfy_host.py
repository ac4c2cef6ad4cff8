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


def esrgan_state_dict(nf: int, gc: int, blocks: int) -> dict[str, torch.Tensor]:
    """A small x4 ESRGAN (BasicSR RRDBNet keys: what Real-ESRGAN releases and spandrel reads), random weights from
    seed 0, zero biases."""
    g = torch.Generator().manual_seed(0)

    def conv(o: int, i: int, prefix: str) -> dict[str, torch.Tensor]:
        return {f"{prefix}.weight": torch.randn(o, i, 3, 3, generator=g) * 0.05, f"{prefix}.bias": torch.zeros(o)}

    sd = conv(nf, 3, "conv_first")
    for b in range(blocks):
        for r in (1, 2, 3):
            for k in range(1, 6):
                sd.update(conv(nf if k == 5 else gc, nf + (k - 1) * gc, f"body.{b}.rdb{r}.conv{k}"))
    for name in ("conv_body", "conv_up1", "conv_up2", "conv_hr"):
        sd.update(conv(nf, nf, name))
    sd.update(conv(3, nf, "conv_last"))
    return sd


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
