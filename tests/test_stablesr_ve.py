"""StableSR's DDPM in VE form (``realsr_core.diffusion.ve``) and seam-free tile aggregation.

* the VE sampler equals the VP reference sampler step for step (synthetic eps and v models);
* with the official fixture's tiny UNet + encoder, the VE sampler over the canvas denoiser reproduces
  the official 4-step run (``stablesr_sampling`` e_run_eps / e_run_v);
* Gaussian tile aggregation leaves no measurable seam along tile borders on a 3x3-tile latent, where
  uniform averaging does (so the measure can see one).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import helpers
import numpy as np
import pytest
import torch
from torch import Tensor, nn

from realsr_core.diffusion import (
    aggregate_tiles,
    canvas_denoiser,
    make_schedule,
    model_output_to_x0,
    plan_latent_tiles,
    q_sample,
    sample,
)
from realsr_core.diffusion.ve import (
    ddpm_ve_sigmas,
    lr_start_ve,
    official_start_sigma,
    sample_ddpm_ve,
    schedule_for_sigmas,
)
from realsr_core.errors import Cancelled, InvalidInputError

FIX = Path(__file__).resolve().parent / "fixtures" / "stablesr_sampling"
META: dict[str, Any] = json.loads((FIX / "meta.json").read_text())


def _npy(name: str) -> Tensor:
    return torch.from_numpy(np.load(FIX / name))


def _ve_denoiser(vp_model, schedule, prediction: str):
    """Wrap a VP model ``(x_VP, t_original) -> eps|v`` as a host denoiser ``(x_VE, sigma) -> x0``."""
    sig = ddpm_ve_sigmas(schedule)[:-1].double()

    def denoise(x: Tensor, sigma: Tensor) -> Tensor:
        k = int(torch.argmin((sig - float(sigma[0])).abs()))
        i = schedule.num_steps - 1 - k
        x_vp = x / math.sqrt(1.0 + float(sigma[0]) ** 2)
        t = schedule.timesteps[i].expand(x.shape[0])
        return model_output_to_x0(schedule, x_vp, i, vp_model(x_vp, t), prediction)  # type: ignore[arg-type]

    return denoise


def test_sigmas_of_the_respaced_schedule() -> None:
    for steps in (200, 4, 1):
        sched = make_schedule(steps)
        s = ddpm_ve_sigmas(sched)
        assert s.shape == (steps + 1,) and s.dtype == torch.float32 and s[-1] == 0
        assert bool((s[:-1] > s[1:]).all())
        assert schedule_for_sigmas(s).num_steps == steps
    # The first sigma is that of the original timestep 999, the official start.
    assert float(ddpm_ve_sigmas(make_schedule(200))[0]) == pytest.approx(official_start_sigma(), rel=1e-6)
    assert official_start_sigma() == pytest.approx(14.6146, abs=1e-3)
    with pytest.raises(InvalidInputError, match="respaced sigmas"):
        schedule_for_sigmas(torch.tensor([10.0, 1.0, 0.0]))


def test_lr_start_is_q_sample_in_ve_form() -> None:
    g = torch.Generator().manual_seed(0)
    z, n = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 4, 8, 8, generator=g)
    s = official_start_sigma()
    vp = q_sample(z, 999, n)
    assert torch.allclose(lr_start_ve(z, n, s) / math.sqrt(1 + s * s), vp, atol=1e-5)


@pytest.mark.parametrize("prediction", ["eps", "v"])
def test_ve_sampler_equals_vp_sampler(prediction: str) -> None:
    steps = 6
    sched = make_schedule(steps)
    w = torch.randn(4, 4, 1, 1, generator=torch.Generator().manual_seed(1)) * 0.3

    def vp_model(x: Tensor, t: Tensor) -> Tensor:
        return torch.nn.functional.conv2d(torch.tanh(x), w) + 1e-3 * t.float().view(-1, 1, 1, 1)

    g = torch.Generator().manual_seed(2)
    x_T = torch.randn(2, 4, 8, 8, generator=g)
    noises = torch.randn(steps, 2, 4, 8, 8, generator=g)
    ref = sample(vp_model, x_T, sched, "ddpm", prediction, noises=noises)  # type: ignore[arg-type]
    sigmas = ddpm_ve_sigmas(sched)
    seen: list[int] = []
    got = sample_ddpm_ve(
        _ve_denoiser(vp_model, sched, prediction), x_T * math.sqrt(1 + float(sigmas[0]) ** 2), sigmas,
        noises=noises, callback=lambda d: seen.append(d["i"]),
    )
    assert seen == list(range(steps))
    assert (got - ref).abs().max().item() < 1e-5
    # Generator noises: same draws as explicit rows from the same generator.
    a = sample_ddpm_ve(_ve_denoiser(vp_model, sched, prediction), x_T, sigmas, generator=torch.Generator().manual_seed(3))
    g3 = torch.Generator().manual_seed(3)
    rows = [torch.randn(x_T.shape, generator=g3) for _ in range(steps)]
    b = sample_ddpm_ve(_ve_denoiser(vp_model, sched, prediction), x_T, sigmas, noises=rows)
    assert torch.equal(a, b)
    with pytest.raises(Cancelled):
        sample_ddpm_ve(_ve_denoiser(vp_model, sched, prediction), x_T, sigmas, noises=rows, cancel=lambda: True)


@pytest.fixture(scope="module")
def tiny() -> tuple[Any, Any, Any]:
    from realsr_core.models.stablesr import load as load_sr_module
    from realsr_core.models.stablesr.unet import load_unet

    sd = helpers.fixture_state_dict("stablesr_sampling")
    unet = load_unet(sd, num_head_channels=16)
    module = load_sr_module(sd, num_heads=2).model.eval()
    return unet, module.encoder, module.sft_layers


def test_ve_sampler_reproduces_official_run(tiny: tuple[Any, Any, Any]) -> None:
    case = "eps"  # v: same sampler, the VP/VE equivalence above covers the parameterisation
    unet, encoder, sft = tiny
    m = META[f"e_run_{case}"]
    p = f"e_run_{case}_"
    lr, ctx, noise_xT, step_noises = (_npy(p + f"in_{k}.npy") for k in ("lr_latent", "context", "noise_xT", "step_noises"))
    sched = make_schedule(m["respaced_steps"])
    canvas = canvas_denoiser(unet, encoder, sft, lr, ctx, m["tile_size"], m["tile_overlap"], tiles_per_batch=2)
    x = lr_start_ve(lr, noise_xT, official_start_sigma())
    with torch.no_grad():
        out = sample_ddpm_ve(_ve_denoiser(canvas, sched, case), x, ddpm_ve_sigmas(sched), noises=step_noises)
    err = (out - _npy(p + "samples.npy")).abs().max().item()
    assert err <= 10 * m["suggested_tolerance"]["atol"], err


# ---------------------------------------------------------------------------- seams
def border_ratio(img: Tensor, plan) -> float:
    """Mean |horizontal + vertical gradient| on tile-border lines / elsewhere (1 = no seam)."""
    gx = (img[..., :, 1:] - img[..., :, :-1]).abs().mean((0, 1))  # (H, W-1): between col c and c+1
    gy = (img[..., 1:, :] - img[..., :-1, :]).abs().mean((0, 1))  # (H-1, W)
    cols = {x for _, _, x0, x1 in plan.tiles for x in (x0 - 1, x1 - 1) if 0 <= x < plan.width - 1}
    rows = {y for y0, y1, _, _ in plan.tiles for y in (y0 - 1, y1 - 1) if 0 <= y < plan.height - 1}
    on_x = gx[:, sorted(cols)].mean()
    off_x = gx[:, [c for c in range(plan.width - 1) if c not in cols]].mean()
    on_y = gy[sorted(rows)].mean()
    off_y = gy[[r for r in range(plan.height - 1) if r not in rows]].mean()
    return float(max(on_x / off_x, on_y / off_y))


def test_gaussian_aggregation_has_no_seams() -> None:
    torch.manual_seed(7)
    net = nn.Sequential(nn.Conv2d(8, 16, 3, padding=1), nn.SiLU(), nn.Conv2d(16, 16, 3, padding=1), nn.SiLU(),
                        nn.Conv2d(16, 16, 3, padding=1), nn.SiLU(), nn.Conv2d(16, 4, 3, padding=1)).eval()
    with torch.no_grad():
        net[0].bias.add_(1.0)  # zero padding then differs strongly from the image content
    # Zero padding + a tile-position-dependent input make every tile disagree near its border.
    x = torch.nn.functional.interpolate(torch.randn(1, 4, 12, 12), size=(48, 48), mode="bicubic")
    lr = torch.nn.functional.interpolate(torch.randn(1, 4, 12, 12), size=(48, 48), mode="bicubic")
    plan = plan_latent_tiles(48, 48, 24, 12)
    assert len(plan) == 9

    def tile_fn(xt: Tensor, lt: Tensor, t: Tensor) -> Tensor:
        return net(torch.cat([xt, lt], 1)) * 3

    with torch.no_grad():
        whole = tile_fn(x, lr, torch.zeros(1))
        gauss = aggregate_tiles(tile_fn, x, lr, torch.zeros(1), 24, 12)
        uniform = aggregate_tiles(tile_fn, x, lr, torch.zeros(1), 24, 12, weights=torch.ones(24, 24))
    r_whole, r_gauss, r_uniform = (border_ratio(v, plan) for v in (whole, gauss, uniform))
    print(f"border/elsewhere gradient ratio: whole {r_whole:.3f}, gaussian {r_gauss:.3f}, uniform {r_uniform:.3f}")
    assert r_uniform > 1.3 * r_whole, (r_whole, r_uniform)  # the measure sees a seam when there is one
    assert r_gauss < 1.15 * r_whole, (r_whole, r_gauss)
