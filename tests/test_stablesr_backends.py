"""What the webui's StableSR script is built from: the k-diffusion sampling backend, SFT attached to a host UNet's
ResBlocks at instance level, and the SD file read without its UNet."""

from __future__ import annotations

import functools
from pathlib import Path

import pytest
import torch
from helpers import fixture_state_dict
from safetensors.torch import save_file
from test_stablesr_cli import META, _npy, _text_state_dict, _vae_state_dict
from torch import Tensor, nn

from realsr_core.checkpoint import read_tensors
from realsr_core.diffusion.engine import CoreSampler
from realsr_core.diffusion.kdiffusion import KDiffusionSampler, timestep_of_sigma
from realsr_core.diffusion.schedule import make_schedule
from realsr_core.diffusion.ve import sample_ddpm_ve
from realsr_core.errors import InvalidInputError, UnsupportedModelError
from realsr_core.models.stablesr import SFTLayer, attach_sft, resblock_channels, resblock_forward_with_sft
from realsr_core.models.stablesr import load as load_sr_module
from realsr_core.models.stablesr.sd import check_module_fits, load_sd
from realsr_core.models.stablesr.unet import load_unet


def test_timestep_of_sigma_inverts_the_training_sigmas() -> None:
    acp = make_schedule(1000).alphas_cumprod.double()
    t = torch.tensor([0, 1, 250, 998, 999])
    sigma = ((1 - acp[t]) / acp[t]).sqrt().float()
    # float32 sigmas: 1e-3 of a timestep (the UNet's embedding does not resolve that).
    assert torch.allclose(timestep_of_sigma(sigma), t.float(), atol=1e-3)
    mid = ((1 - acp[[10, 11]]) / acp[[10, 11]]).sqrt().log().mean().exp().float()[None]
    assert 10.0 < timestep_of_sigma(mid).item() < 11.0


@pytest.mark.parametrize("case", ["eps", "v"])
def test_kdiffusion_backend_runs_the_official_ddpm_like_the_core_sampler(case: str) -> None:
    """The official DDPM written as a k-diffusion sampler, driven through the backend's denoiser (VE form, sigma
    to timestep, eps / v to x0, canvas tiles), gives the core sampler's latent with the same noises: so the webui
    path converts both prediction types right.  Tolerance 1e-4: the VE and the official arithmetic round
    differently over 4 steps (measured 2e-6)."""
    sd = fixture_state_dict("stablesr_sampling")
    unet = load_unet(sd, num_head_channels=16)
    module = load_sr_module(sd, num_heads=2).model.eval()
    m, p = META[f"e_run_{case}"], f"e_run_{case}_"
    lr, ctx, noises = (_npy(p + f"in_{k}.npy") for k in ("lr_latent", "context", "step_noises"))
    kw = dict(prediction=case, steps=m["respaced_steps"], seed=5, latent_scale=1.0)
    core = CoreSampler(unet, module.encoder, module.sft_layers, ctx, step_noises=noises, **kw)
    ticks: list[tuple[int, int]] = []
    kdiff = KDiffusionSampler(functools.partial(sample_ddpm_ve, noises=noises), unet, module.encoder,
                              module.sft_layers, ctx, progress=lambda d, n: ticks.append((d, n)), **kw)
    with torch.no_grad():
        a = core(lr, m["tile_size"], m["tile_overlap"])
        b = kdiff(lr, m["tile_size"], m["tile_overlap"])
    assert (a - b).abs().max().item() < 1e-4
    assert ticks == [(k + 1, m["respaced_steps"]) for k in range(m["respaced_steps"])]


def test_kdiffusion_backend_guidance_uses_the_negative_context() -> None:
    sd = fixture_state_dict("stablesr_sampling")
    unet = load_unet(sd, num_head_channels=16)
    module = load_sr_module(sd, num_heads=2).model.eval()
    m, p = META["e_run_eps"], "e_run_eps_"
    lr, ctx = _npy(p + "in_lr_latent.npy"), _npy(p + "in_context.npy")

    def euler(model, x, sigmas, extra_args=None, callback=None, disable=None):  # k-diffusion's plain Euler
        for i in range(len(sigmas) - 1):
            d = (x - model(x, sigmas[i] * x.new_ones(x.shape[0]))) / sigmas[i]
            x = x + d * (sigmas[i + 1] - sigmas[i])
        return x

    def run(uncond: Tensor | None, cfg: float) -> Tensor:
        s = KDiffusionSampler(euler, unet, module.encoder, module.sft_layers, ctx, uncond, cfg=cfg, prediction="eps",
                              steps=3, seed=1, latent_scale=1.0)
        with torch.no_grad():
            return s(lr, m["tile_size"], m["tile_overlap"])

    plain = run(None, 1.0)
    assert torch.equal(run(torch.zeros_like(ctx), 1.0), plain)  # cfg 1: the negative context is not run
    guided = run(torch.zeros_like(ctx), 5.0)
    assert torch.isfinite(guided).all() and (guided - plain).abs().max().item() > 1e-3


class _ResBlock(nn.Module):
    """The ResBlock interface the hosts share (ldm, ComfyUI, Forge): ``forward`` calls ``self._forward``."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.out_channels = channels
        self.in_layers = nn.Sequential(nn.GroupNorm(4, channels), nn.SiLU(), nn.Conv2d(channels, channels, 3, padding=1))
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(8, channels))
        self.out_layers = nn.Sequential(nn.GroupNorm(4, channels), nn.SiLU(), nn.Dropout(0.0),
                                        nn.Conv2d(channels, channels, 3, padding=1))
        self.skip_connection = nn.Identity()

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        return self._forward(x, emb)

    def _forward(self, x: Tensor, emb: Tensor) -> Tensor:
        h = self.in_layers(x) + self.emb_layers(emb)[..., None, None]
        return self.skip_connection(x) + self.out_layers(h)


def test_attach_sft_modulates_the_host_blocks_at_instance_level_and_detaches() -> None:
    torch.manual_seed(0)
    unet = nn.Module()
    unet.input_blocks = nn.ModuleList([nn.Sequential(_ResBlock(32)), nn.Sequential(_ResBlock(32))])
    other = _ResBlock(32)  # another model of the same class: never touched
    layer = SFTLayer(32, cond_channels=4, hidden_channels=8)
    nn.init.normal_(layer.mlp_gamma.weight, std=0.3)
    sft = [("input_blocks.0.0", layer)]
    mine = lambda *a: a[0]  # noqa: E731 - another extension's instance override on block 1
    unet.input_blocks[1][0]._forward = mine
    x, emb, cond = torch.randn(2, 32, 6, 6), torch.randn(2, 8), {(6, 6): torch.randn(1, 4, 6, 6)}
    block = unet.input_blocks[0][0]
    plain = block(x, emb)
    current: list = [None]
    detach = attach_sft(unet, sft, lambda: current[0])
    assert torch.equal(block(x, emb), plain)  # no condition (another sampler): the block runs as before
    current[0] = cond
    with torch.no_grad():
        assert torch.allclose(block(x, emb), resblock_forward_with_sft(block, x, emb, layer, cond), atol=1e-6)
        assert not torch.allclose(block(x, emb), plain, atol=1e-3)
        assert torch.equal(other(x, emb), other._forward(x, emb))
    detach()
    assert "_forward" not in block.__dict__ and unet.input_blocks[1][0].__dict__["_forward"] is mine
    assert torch.equal(block(x, emb), plain)
    assert resblock_channels(unet)("input_blocks.0.0") == 32 and resblock_channels(unet)("input_blocks.5.0") is None
    with pytest.raises(InvalidInputError, match="no ResBlock at output_blocks.0.0"):
        attach_sft(unet, [("output_blocks.0.0", layer)], lambda: None)


def test_a_module_for_another_unet_is_refused_naming_the_blocks() -> None:
    sd = fixture_state_dict("stablesr_sampling")
    module = load_sr_module(sd, num_heads=2).model
    unet = load_unet(sd, num_head_channels=16)
    check_module_fits(module, lambda path: unet.get_submodule(path).out_channels)
    with pytest.raises(InvalidInputError, match=r"does not fit this UNet.*input_blocks.1.0 \(missing\)"):
        check_module_fits(module, resblock_channels(nn.Module()))


def test_sd_file_read_without_its_unet(tmp_path: Path) -> None:
    full = fixture_state_dict("stablesr_sampling")
    unet = {k: v for k, v in full.items() if k.startswith("model.diffusion_model.") and ".spade." not in k}
    width = int(unet["model.diffusion_model.middle_block.1.transformer_blocks.0.attn2.to_k.weight"].shape[1])
    sd = {**unet, **_vae_state_dict(1), **_text_state_dict(width, 2)}
    save_file(sd, str(tmp_path / "tiny.safetensors"))
    torch.save({"state_dict": sd, "global_step": 3}, tmp_path / "tiny.ckpt")
    whole = load_sd(tmp_path / "tiny.safetensors")
    for name in ("tiny.safetensors", "tiny.ckpt"):
        part = load_sd(tmp_path / name, unet=False)
        assert part.unet is None and part.prediction == whole.prediction == "eps"
        assert all(torch.equal(a, b) for a, b in zip(part.vae.model.state_dict().values(),
                                                     whole.vae.model.state_dict().values(), strict=True))
        assert torch.equal(part.context(), whole.context())
    assert load_sd(tmp_path / "tiny.safetensors", unet=False, text=False).text is None
    got = read_tensors(tmp_path / "tiny.ckpt", ("first_stage_model.",))
    assert got and all(k.startswith("first_stage_model.") for k in got)
    sd1 = dict(sd)
    k = "model.diffusion_model.middle_block.1.transformer_blocks.0.attn2.to_k.weight"
    sd1[k] = torch.zeros(sd1[k].shape[0], 768)
    save_file(sd1, str(tmp_path / "sd15.safetensors"))
    with pytest.raises(UnsupportedModelError, match="sd15.safetensors: SD 1.x; StableSR runs on Stable Diffusion 2.1"):
        load_sd(tmp_path / "sd15.safetensors", unet=False)
