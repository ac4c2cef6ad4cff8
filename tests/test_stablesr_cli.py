"""StableSR as one core engine: the official sampling through the engine's core backend, and the command line
on a tiny SD 2-structured checkpoint (official layout: UNet, VAE and OpenCLIP text tower in one file) with the
fixture's StableSR module, so it runs in CI."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import FIXTURES, fixture_state_dict, skimage_photo
from PIL import Image
from safetensors.torch import save_file

from realsr_core.__main__ import main
from realsr_core.diffusion import plan_latent_tiles
from realsr_core.diffusion.engine import CoreSampler, prepare_image
from realsr_core.imageio import save_image
from realsr_core.models.stablesr import load as load_sr_module
from realsr_core.models.stablesr.cfw import build_vae
from realsr_core.models.stablesr.sd import is_v_prediction, load_sd
from realsr_core.models.stablesr.text import OpenCLIPTextTower, TextTowerConfig
from realsr_core.models.stablesr.unet import load_unet

pytestmark = pytest.mark.usefixtures("one_thread")
META = __import__("json").loads((FIXTURES / "stablesr_sampling" / "meta.json").read_text())


def _npy(name: str) -> torch.Tensor:
    return torch.from_numpy(np.load(FIXTURES / "stablesr_sampling" / name))


@pytest.mark.parametrize("case", ["eps", "v"])
def test_engine_core_sampler_reproduces_the_official_run(case: str) -> None:
    """The official 4-step canvas run (fixture), now through the engine's sampling backend."""
    sd = fixture_state_dict("stablesr_sampling")
    unet = load_unet(sd, num_head_channels=16)
    module = load_sr_module(sd, num_heads=2).model.eval()
    m, p = META[f"e_run_{case}"], f"e_run_{case}_"
    lr, ctx, noise_xT, noises = (_npy(p + f"in_{k}.npy") for k in ("lr_latent", "context", "noise_xT", "step_noises"))
    sampler = CoreSampler(unet, module.encoder, module.sft_layers, ctx, prediction=case, steps=m["respaced_steps"],
                          seed=0, latent_scale=1.0, noise_x_T=noise_xT, step_noises=noises)
    with torch.no_grad():
        out = sampler(lr, m["tile_size"], m["tile_overlap"])
    ref = _npy(p + "samples.npy")
    assert (out - ref).abs().max().item() <= m["suggested_tolerance"]["atol"]


def _text_state_dict(width: int, seed: int) -> dict[str, torch.Tensor]:
    cfg = TextTowerConfig(width=width, layers=3, heads=1, context_length=77, vocab_size=49408, mlp_width=4 * width)
    g = torch.Generator().manual_seed(seed)
    tower = OpenCLIPTextTower(cfg)
    out = {f"cond_stage_model.model.{k}": torch.randn(v.shape, generator=g) * 0.05 for k, v in tower.state_dict().items()}
    # The released files keep the last block too (never run: the context is the penultimate block's output).
    for k, v in tower.transformer.resblocks[0].state_dict().items():
        out[f"cond_stage_model.model.transformer.resblocks.2.{k}"] = torch.randn(v.shape, generator=g) * 0.05
    for k in [k for k in out if "ln_" in k]:
        out[k] = torch.ones_like(out[k]) if k.endswith("weight") else torch.zeros_like(out[k])
    return out


def _vae_state_dict(seed: int) -> dict[str, torch.Tensor]:
    config = {"ch": 32, "ch_mult": [1, 2, 2, 2], "num_res_blocks": 1, "z_channels": 4, "embed_dim": 4,
              "double_z": True, "in_channels": 3, "out_channels": 3, "mid_attn": True, "shortcut": "nin_shortcut",
              "enc_attn_levels": [], "dec_attn_levels": [], "fusion_levels": []}
    torch.manual_seed(seed)
    vae = build_vae(config)
    return {f"first_stage_model.{k}": v.detach().clone() for k, v in vae.state_dict().items()}


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A tiny SD 2.x file (UNet of the sampling fixture, random VAE and text tower) and the module as a
    Lightning checkpoint, both in the released layouts."""
    folder = tmp_path_factory.mktemp("sd")
    full = fixture_state_dict("stablesr_sampling")
    unet = {k: v for k, v in full.items() if k.startswith("model.diffusion_model.") and ".spade." not in k}
    width = int(unet["model.diffusion_model.middle_block.1.transformer_blocks.0.attn2.to_k.weight"].shape[1])
    sd = {**unet, **_vae_state_dict(1), **_text_state_dict(width, 2)}
    save_file(sd, str(folder / "tiny_sd21.safetensors"))
    module = {k: v for k, v in full.items() if not k.startswith("model.diffusion_model.") or ".spade." in k}
    torch.save({"state_dict": module, "epoch": 117}, folder / "tiny_stablesr.ckpt")
    save_image(skimage_photo("astronaut")[:, :, 100:124, 180:200], folder / "face.png")  # 20x24
    return {"sd": folder / "tiny_sd21.safetensors", "module": folder / "tiny_stablesr.ckpt",
            "image": folder / "face.png", "folder": folder}


def _cli(files: dict[str, Path], out: Path, *extra: str) -> int:
    return main(["stablesr", str(files["image"]), "-o", str(out), "--sd", str(files["sd"]), "--module",
                 str(files["module"]), "--steps", "3", "--upscale", "2", *extra])


def test_cli_writes_the_upscaled_image_deterministically_per_seed(tmp_path: Path, files, capsys) -> None:
    a, b, c = tmp_path / "a.png", tmp_path / "b.png", tmp_path / "c.png"
    assert _cli(files, a, "--seed", "7") == 0
    err = capsys.readouterr().err
    assert "SD 2.x eps-prediction" in err and "(3 steps)" in err and "tiles" in err
    assert Image.open(a).size == (40, 48)
    assert _cli(files, b, "--seed", "7") == 0 and _cli(files, c, "--seed", "8") == 0
    digest = {p.name: hashlib.sha256(np.asarray(Image.open(p)).tobytes()).hexdigest() for p in (a, b, c)}
    assert digest["a.png"] == digest["b.png"] != digest["c.png"]  # same process, same ops: same pixels
    # A finished result is skipped; the output rules of every command hold.
    assert _cli(files, a, "--seed", "9") == 0 and "already done" in capsys.readouterr().err


def test_cli_refuses_a_non_sd_checkpoint_and_a_module_that_does_not_fit(tmp_path: Path, files, capsys) -> None:
    from realsr_core.weights import builtin_path

    out = tmp_path / "x.png"
    rc = main(["stablesr", str(files["image"]), "-o", str(out), "--sd", str(builtin_path()), "--module",
               str(files["module"])])
    assert rc == 2
    assert "not a Stable Diffusion checkpoint" in capsys.readouterr().err
    # A UNet twice as wide as the module's SFT layers expect: refused before any work, naming the blocks.
    narrow_sd = _narrow_unet_file(tmp_path)
    rc = main(["stablesr", str(files["image"]), "-o", str(out), "--sd", str(narrow_sd), "--module", str(files["module"])])
    assert rc == 2
    err = capsys.readouterr().err
    assert "the StableSR module does not fit this UNet" in err and "channels, module" in err
    assert not out.exists()


def _narrow_unet_file(tmp_path: Path) -> Path:
    """An SD 2-structured file whose UNet is twice as wide (model_channels 64 instead of 32)."""
    from realsr_core.models.stablesr.unet import StableSRUNet, infer_unet_config, unet_state_dict

    full = fixture_state_dict("stablesr_sampling")
    cfg = infer_unet_config(unet_state_dict(full), num_head_channels=16)
    cfg = type(cfg)(**{**cfg.as_dict(), "model_channels": cfg.model_channels * 2})
    torch.manual_seed(3)
    unet = StableSRUNet(cfg)
    sd = {f"model.diffusion_model.{k}": v.detach().clone() for k, v in unet.state_dict().items()}
    width = int(sd["model.diffusion_model.middle_block.1.transformer_blocks.0.attn2.to_k.weight"].shape[1])
    sd.update(_vae_state_dict(1))
    sd.update(_text_state_dict(width, 2))
    path = tmp_path / "narrow.safetensors"
    save_file(sd, str(path))
    return path


def test_v_prediction_is_read_from_the_weights(files) -> None:
    model = load_sd(files["sd"])
    assert model.prediction == "eps" and model.context().shape[:2] == (1, 77)
    bias = torch.randn(64, generator=torch.Generator().manual_seed(0)) * 0.2
    assert is_v_prediction({"output_blocks.11.1.transformer_blocks.0.norm1.bias": bias})
    assert not is_v_prediction({"output_blocks.11.1.transformer_blocks.0.norm1.bias": torch.zeros(64)})


def test_info_describes_an_sd_file(files, capsys) -> None:
    assert main(["info", str(files["sd"])]) == 0
    out = capsys.readouterr().out
    assert '"arch": "sd2"' in out and '"prediction": "eps"' in out


def test_prepare_image_pads_to_32_and_keeps_the_upscaled_size() -> None:
    x = skimage_photo("coffee")[:, :, :21, :30]
    up, padded = prepare_image(x, 2.0)
    assert up.shape[-2:] == (42, 60) and padded.shape[-2:] == (64, 64)
    assert torch.equal(padded[..., :42, :60], up)
    assert len(plan_latent_tiles(8, 8, 64, 32)) == 1
