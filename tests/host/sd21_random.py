"""Real-size Stable Diffusion 2.1 checkpoints with deterministic random weights (no download possible here).

ComfyUI's checkpoint loader recognises SD 2.x only from full-size UNets, so the shipped StableSR workflows
can run through a real server only with full-size files.  This script writes them in the released layouts:

* ``v2-1_512-ema-pruned.safetensors`` / ``v2-1_768-ema-pruned.safetensors``: flat LDM checkpoints
  (``model.diffusion_model.*``, ``cond_stage_model.model.*`` = OpenCLIP ViT-H text tower,
  ``first_stage_model.*``).  ComfyUI tells 768-v from 512 by the spread of one UNet bias (see
  ``comfy.supported_models.SD20.model_type``), so that bias is drawn wide for the v model and zero otherwise.
* ``stablesr_turbo.ckpt``: the Lightning container of a full StableSR checkpoint: the SD 2.1 512 weights plus
  the StableSR module (``structcond_stage_model.*`` and ``*.spade.*``) from the ``stablesr_struct`` manifest.

Key sets and shapes come from our own SD2 UNet / VAE classes (official LDM names, built on the meta device)
and from ComfyUI's SD2 text-encoder definition converted back to the original layout by ComfyUI itself, so
the files are exactly what ComfyUI expects of the real ones.  Values: per-key seeded normal draws scaled by
1/sqrt(fan_in), norms at 1, biases at 0; stored in float16 (2.6 GB a file).

Run with ComfyUI importable: ``COMFYUI_PATH=... python tests/host/sd21_random.py OUT_DIR [--only NAME ...]``.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

FILES = ("v2-1_512-ema-pruned.safetensors", "v2-1_768-ema-pruned.safetensors", "stablesr_turbo.ckpt")
VPRED_KEY = "model.diffusion_model.output_blocks.11.1.transformer_blocks.0.norm1.bias"
VERSION = "1"  # bump when the generation rule changes (cached files are keyed by it)


def _value(name: str, shape: torch.Size, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(int.from_bytes(hashlib.sha256(f"{seed}:{name}".encode()).digest()[:7], "little"))
    leaf = name.rsplit(".", 1)[-1]
    if len(shape) == 0:
        return torch.tensor(4.6052)  # OpenCLIP logit_scale = log(100)
    if "embedding" in name and len(shape) == 2:
        return torch.randn(shape, generator=g) * 0.01
    if len(shape) >= 2:
        fan_in = int(torch.tensor(shape[1:]).prod())
        return torch.randn(shape, generator=g) / fan_in**0.5
    if leaf == "weight":
        return torch.ones(shape)
    return torch.zeros(shape)


def unet_shapes() -> dict[str, torch.Size]:
    from realsr_core.models.stablesr.unet import StableSRUNet, UNetConfig

    with torch.device("meta"):
        unet = StableSRUNet(UNetConfig())
    return {f"model.diffusion_model.{k}": v.shape for k, v in unet.state_dict().items()}


def vae_shapes() -> dict[str, torch.Size]:
    import json

    man = json.loads((ROOT / "tests" / "fixtures" / "stablesr_cfw" / "manifest.json").read_text())
    return {f"first_stage_model.{k}": torch.Size(s) for k, s, _ in man["keys"] if ".fusion_layer_" not in k}


def clip_shapes() -> dict[str, torch.Size]:
    """The OpenCLIP ViT-H text tower in the original layout, as ComfyUI converts its own SD2 CLIP back."""
    import comfy.model_detection
    import comfy.sd

    unet = {k: torch.empty(v, device="meta") for k, v in unet_shapes().items()}
    config = comfy.model_detection.model_config_from_unet(unet, "model.diffusion_model.")
    clip = comfy.sd.CLIP(config.clip_target(), embedding_directory=None)
    sd = config.process_clip_state_dict_for_saving(clip.get_sd())
    return {k: v.shape for k, v in sd.items() if v.is_floating_point()}


def sd21_state_dict(v_prediction: bool, seed: int = 0) -> dict[str, torch.Tensor]:
    shapes = {**unet_shapes(), **clip_shapes(), **vae_shapes()}
    sd = {k: _value(k, s, seed).half() for k, s in shapes.items()}
    g = torch.Generator().manual_seed(seed + 1)
    # ComfyUI: std of this bias > 0.09 means v-prediction (768-v); the released 512 file has it near 0.
    sd[VPRED_KEY] = (torch.randn(sd[VPRED_KEY].shape, generator=g) * (0.5 if v_prediction else 0.0)).half()
    return sd


def stablesr_module_state_dict() -> dict[str, torch.Tensor]:
    from helpers import fixture_state_dict

    return {k: v.half() for k, v in fixture_state_dict("stablesr_struct").items()}


def write(out: Path, names: list[str]) -> None:
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    for name in names:
        path = out / name
        if path.exists():
            continue
        tmp = path.with_name(path.name + ".part")
        if name.endswith(".safetensors"):
            save_file(sd21_state_dict(v_prediction="768" in name), str(tmp))
        else:
            sd = sd21_state_dict(v_prediction=False)
            sd.update(stablesr_module_state_dict())
            torch.save({"state_dict": sd, "global_step": 0}, tmp)
        os.replace(tmp, path)
        print(f"wrote {path} ({path.stat().st_size / 2**30:.2f} GiB)", flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("out", type=Path)
    p.add_argument("--only", nargs="*", default=list(FILES), choices=FILES)
    a = p.parse_args()
    comfy_path = os.environ.get("COMFYUI_PATH")
    if not comfy_path:
        sys.exit("set COMFYUI_PATH to a ComfyUI checkout (its SD2 text-encoder definition gives the CLIP keys)")
    sys.path.insert(0, comfy_path)
    from comfy.cli_args import args

    args.cpu = True  # before comfy.model_management is imported
    write(a.out, a.only)


if __name__ == "__main__":
    main()
