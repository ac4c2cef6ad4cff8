"""StableSR sampling core against the official ``stablesr_sampling`` oracle fixture.

Covers the respaced schedule tables, the canvas tile plans, the Gaussian tile weights, one aggregated
DDPM step (eps and v) and the 4-step official runs with the fixture's tiny UNet + time-aware encoder,
plus sampler / aggregation properties on cheap synthetic models.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import helpers
import numpy as np
import pytest
import torch
from torch import Tensor, nn

from realsr_core.diffusion import (
    DDPMSchedule,
    SampleTrace,
    aggregate_tiles,
    canvas_denoiser,
    ddpm_step,
    initial_latent,
    make_schedule,
    plan_latent_tiles,
    q_sample,
    sample,
    space_timesteps,
    stablesr_sample,
)
from realsr_core.errors import Cancelled, InvalidInputError
from realsr_core.models.stablesr import load as load_sr_module
from realsr_core.models.stablesr.unet import StableSRUNet, UNetConfig, infer_unet_config, load_unet
from realsr_core.tiling import gaussian_weights

FIX = Path(__file__).resolve().parent / "fixtures" / "stablesr_sampling"
META: dict[str, Any] = json.loads((FIX / "meta.json").read_text())
# The tiny fixture models' attention splits (not stored in the weights).
TINY_UNET_HEAD_CHANNELS = 16
TINY_ENCODER_HEADS = 2


def _npy(name: str) -> Tensor:
    return torch.from_numpy(np.load(FIX / name))


def _maxdiff(a: Tensor, ref: Tensor) -> float:
    assert tuple(a.shape) == tuple(ref.shape), (tuple(a.shape), tuple(ref.shape))
    return float((a.double() - ref.double()).abs().max())


@pytest.fixture(scope="module")
def tiny() -> tuple[StableSRUNet, Any, Any]:
    sd = helpers.fixture_state_dict("stablesr_sampling")
    unet = load_unet(sd, num_head_channels=TINY_UNET_HEAD_CHANNELS)
    module = load_sr_module(sd, num_heads=TINY_ENCODER_HEADS).model.eval()
    return unet, module.encoder, module.sft_layers


# ---------------------------------------------------------------------------- schedule
@pytest.mark.parametrize("steps", [200, 4, 1000])
def test_schedule_tables_bit_exact(steps: int) -> None:
    ref = np.load(FIX / f"schedule_{steps}.npz")
    ours = make_schedule(steps)
    base = make_schedule(None)
    for key in ref.files:
        if key == "ori_timesteps":
            got = ours.timesteps.numpy()
        elif key.startswith("orig1000_"):
            got = getattr(base, key[len("orig1000_") :]).numpy()
        else:
            got = getattr(ours, key).numpy()
        assert got.dtype == ref[key].dtype, key
        if "log" in key:
            # np.log is ISA-dispatched (AVX2/AVX-512 SIMD vs libm logf on older x86: 2 ulp apart seen): ulps, not bits.
            np.testing.assert_array_max_ulp(got, ref[key], maxulp=4)
        else:  # float64 math rounded to float32: checked bit-identical under every torch/numpy x86 dispatch level
            np.testing.assert_array_equal(got, ref[key], err_msg=key)


def test_space_timesteps() -> None:
    assert space_timesteps(1000, [4]) == [0, 333, 666, 999]
    s200 = space_timesteps(1000, 200)
    assert s200[:3] == [0, 5, 10] and s200[-2:] == [994, 999] and len(s200) == 200
    assert space_timesteps(1000, 1000) == list(range(1000))
    with pytest.raises(InvalidInputError):
        space_timesteps(10, [11])


def test_q_sample_start() -> None:
    lr = torch.randn(2, 4, 8, 8)
    noise = torch.randn_like(lr)
    x_T = q_sample(lr, 999, noise)
    torch.testing.assert_close(x_T, 0.0682649165391922 * lr + 0.9976672530174255 * noise)
    torch.testing.assert_close(initial_latent(lr, "lr", noise=noise), x_T)
    torch.testing.assert_close(initial_latent(lr, "noise", noise=noise), noise)


# ---------------------------------------------------------------------------- tile plans, weights
# Our documented clamp for the sizes the official sampler fails on: the tile shrinks to the latent.
CLAMPED = {
    "latent64x64_tile96_ov48": [[0, 64, 0, 64]],
    "latent100x75_tile96_ov48": [[0, 96, 0, 75], [4, 100, 0, 75]],
}


@pytest.mark.parametrize("name", sorted(META["b_tile_plans"]["plans"]))
def test_tile_plans(name: str) -> None:
    rec = META["b_tile_plans"]["plans"][name]
    h, w, tile, ov = map(int, re.fullmatch(r"latent(\d+)x(\d+)_tile(\d+)_ov(\d+)", name).groups())  # type: ignore[union-attr]
    if "error" in rec:
        with pytest.raises(InvalidInputError, match="smaller than"):
            plan_latent_tiles(h, w, tile, ov, clamp=False)
        assert [list(t) for t in plan_latent_tiles(h, w, tile, ov).tiles] == CLAMPED[name]
    else:
        plan = plan_latent_tiles(h, w, tile, ov)
        assert [list(t) for t in plan.tiles] == rec["tiles_y0_y1_x0_x1_in_processing_order"]
        assert plan.tile_h == plan.tile_w == tile


@pytest.mark.parametrize("size", [64, 96])
def test_gaussian_weights(size: int) -> None:
    ref = np.load(FIX / f"gaussian_weights_{size}.npy")
    got = gaussian_weights(size, size).numpy()
    np.testing.assert_allclose(got, ref, rtol=1e-12, atol=0)
    assert got[size // 2, (size - 1) // 2] == pytest.approx(META["c_gaussian_weights"]["maps"][str(size)]["center_value"], rel=1e-6)


# ---------------------------------------------------------------------------- fixture runs (tiny models)
@pytest.mark.parametrize(("case", "tiles_per_batch"), [("eps", 3), ("v", 1)])
def test_aggregated_step(tiny: tuple[Any, Any, Any], case: str, tiles_per_batch: int) -> None:
    unet, encoder, sft = tiny
    m = META[f"d_step_{case}"]
    p = f"d_step_{case}_"
    x_t, lr, ctx, noise = (_npy(p + f"in_{k}.npy") for k in ("x_t", "lr_latent", "context", "noise"))
    sched = make_schedule(m["respaced_steps"])
    i = m["respaced_index_i"]
    assert int(sched.timesteps[i]) == m["original_timestep_t_replace"]
    tiles: list[Tensor] = []

    def recording_unet(*args: Any) -> Tensor:
        out = unet(*args)
        tiles.extend(out.unbind(0))
        return out

    model = canvas_denoiser(
        recording_unet, encoder, sft, lr, ctx, m["tile_size"], m["tile_overlap"], tiles_per_batch=tiles_per_batch
    )
    out = model(x_t, sched.timesteps[i].reshape(1))
    step = ddpm_step(sched, x_t, i, out, case, noise)
    atol = m["suggested_tolerance"]["atol"]
    got = {
        "tiles": torch.stack(tiles),
        "model_out": out,
        "x0_pred": step.x0_pred,
        "posterior_mean": step.mean,
        "posterior_log_variance": step.log_variance.reshape(1),
        "x_prev": step.x_prev,
    }
    errors = {k: _maxdiff(v, _npy(p + f"{k}.npy")) for k, v in got.items()}
    assert all(e <= atol for e in errors.values()), errors


@pytest.mark.slow
@pytest.mark.parametrize(("case", "tiles_per_batch"), [("eps", 2), ("v", 4)])
def test_full_run(tiny: tuple[Any, Any, Any], case: str, tiles_per_batch: int) -> None:
    unet, encoder, sft = tiny
    m = META[f"e_run_{case}"]
    p = f"e_run_{case}_"
    lr, ctx, noise_xT, step_noises = (_npy(p + f"in_{k}.npy") for k in ("lr_latent", "context", "noise_xT", "step_noises"))
    trace = SampleTrace()
    previews: list[int] = []
    progress: list[tuple[int, int]] = []
    final = stablesr_sample(
        unet,
        encoder,
        sft,
        lr,
        ctx,
        steps=m["respaced_steps"],
        prediction=case,  # type: ignore[arg-type]
        tile_size=m["tile_size"],
        tile_overlap=m["tile_overlap"],
        start="lr",
        noise_x_T=noise_xT,
        noises=step_noises,
        tiles_per_batch=tiles_per_batch,
        callback=lambda k, x0: previews.append(k),
        progress=lambda d, n: progress.append((d, n)),
        trace=trace,
    )
    atol = m["suggested_tolerance"]["atol"]
    got = {
        "x_T": trace.x_t[0],
        "model_out_each_step": torch.cat(trace.model_out),
        "x0_each_step": torch.cat(trace.x0_pred),
        "x_after_each_step": torch.cat(trace.x_prev),
        "samples": final,
    }
    errors = {k: _maxdiff(v, _npy(p + f"{k}.npy")) for k, v in got.items()}
    assert all(e <= atol for e in errors.values()), errors
    n_tiles = len(plan_latent_tiles(lr.shape[-2], lr.shape[-1], m["tile_size"], m["tile_overlap"]))
    assert previews == [0, 1, 2, 3]
    assert progress[-1] == (4 * n_tiles, 4 * n_tiles)


# ---------------------------------------------------------------------------- UNet layout
def test_unet_config_inference_sd21() -> None:
    with torch.device("meta"):
        net = StableSRUNet(UNetConfig())
    sd = net.state_dict()
    assert infer_unet_config(sd) == UNetConfig()
    assert "input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight" in sd
    assert tuple(sd["input_blocks.1.1.proj_in.weight"].shape) == (320, 320)
    assert tuple(sd["output_blocks.11.1.transformer_blocks.0.attn2.to_k.weight"].shape) == (320, 1024)
    assert len(net.resblock_paths()) == 22
    assert 860e6 < sum(t.numel() for t in sd.values()) < 870e6  # SD 2.1 UNet: 865.9 M


def test_unet_odd_size_and_plain_forward(tiny: tuple[Any, Any, Any]) -> None:
    unet, encoder, sft = tiny
    x = torch.randn(2, 4, 20, 28)
    t = torch.tensor([10, 900])
    ctx = torch.randn(1, 5, 32)
    with torch.no_grad():
        plain = unet(x, t, ctx)
        cond = encoder(x, t)
        modulated = unet(x, t, ctx, cond, sft)
        odd = unet(torch.randn(1, 4, 13, 9), t[:1], ctx, encoder(torch.randn(1, 4, 13, 9), t[:1]), sft)
    assert plain.shape == modulated.shape == x.shape and odd.shape == (1, 4, 13, 9)
    assert not torch.allclose(plain, modulated)
    # Per-sample independence of the batch.
    with torch.no_grad():
        single = unet(x[1:], t[1:], ctx, encoder(x[1:], t[1:]), sft)
    torch.testing.assert_close(single, modulated[1:], atol=1e-5, rtol=0)


# ---------------------------------------------------------------------------- cheap synthetic checks
class _TileNet(nn.Module):
    """A content-, condition- and timestep-dependent tile denoiser with 6 output channels."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(8, 6, 3, padding=1)

    def forward(self, x: Tensor, lr: Tensor, t: Tensor) -> Tensor:
        return self.conv(torch.cat([x, lr], 1)) * (1 + t.float()[:, None, None, None] / 1000)


def test_tiles_per_batch_invariance() -> None:
    net = _TileNet()
    x = torch.randn(2, 4, 100, 75)
    lr = torch.randn(2, 4, 100, 75)
    t = torch.tensor([5, 700])
    calls: list[int] = []

    def fn(xt: Tensor, lt: Tensor, tt: Tensor) -> Tensor:
        calls.append(xt.shape[0])
        return net(xt, lt, tt)

    with torch.no_grad():
        one = aggregate_tiles(fn, x, lr, t, 64, 32, tiles_per_batch=1)
        three = aggregate_tiles(fn, x, lr, t, 64, 32, tiles_per_batch=3)
        per_image = torch.cat([aggregate_tiles(fn, x[b : b + 1], lr[b : b + 1], t[b : b + 1], 64, 32) for b in range(2)])
    assert calls[:6] == [2] * 6 and calls[6:8] == [6, 6]
    assert one.shape == (2, 6, 100, 75)
    # Other batch sizes may pick other conv kernels (seen: 1.7e-6 on a pre-AVX2 code path): float32 ulp, not bits.
    torch.testing.assert_close(three, one, atol=4e-6, rtol=0)
    torch.testing.assert_close(per_image, one, atol=4e-6, rtol=0)


def test_aggregation_blends_constant_and_cancels() -> None:
    x = torch.zeros(1, 4, 80, 112)
    const = aggregate_tiles(lambda a, b, t: torch.full_like(a, 3.0), x, x, torch.tensor([1]), 64, 32)
    torch.testing.assert_close(const, torch.full_like(x, 3.0))
    seen: list[tuple[int, int]] = []
    with pytest.raises(Cancelled):
        aggregate_tiles(
            lambda a, b, t: a, x, x, torch.tensor([1]), 64, 32, progress=lambda d, n: seen.append((d, n)),
            cancel=lambda: len(seen) >= 2,
        )
    assert seen == [(1, 6), (2, 6)]


class _OracleDenoiser:
    """Knows the clean latent: returns the exact eps (or v) of ``x_t`` for ``target`` on the 1000-step table."""

    def __init__(self, target: Tensor, prediction: str) -> None:
        self.target = target
        self.prediction = prediction
        self.base: DDPMSchedule = make_schedule(None)

    def __call__(self, x: Tensor, t: Tensor) -> Tensor:
        a = self.base.alphas_cumprod.double()[t.long()].reshape(-1, 1, 1, 1)
        eps = (x.double() - a.sqrt() * self.target) / (1 - a).sqrt()
        out = eps if self.prediction == "eps" else a.sqrt() * eps - (1 - a).sqrt() * self.target
        return out.float()


@pytest.mark.parametrize("prediction", ["eps", "v"])
def test_ddim_eta0_deterministic_fixed_point(prediction: str) -> None:
    target = torch.randn(2, 4, 8, 8, dtype=torch.float64)
    model = _OracleDenoiser(target, prediction)
    sched = make_schedule(20)
    x_T = initial_latent(target.float(), "noise", generator=torch.Generator().manual_seed(1))
    x0s: list[Tensor] = []
    run1 = sample(model, x_T, sched, sampler="ddim", prediction=prediction, eta=0.0,  # type: ignore[arg-type]
                  generator=torch.Generator().manual_seed(2), callback=lambda k, x0: x0s.append(x0))
    run2 = sample(model, x_T, sched, sampler="ddim", prediction=prediction, eta=0.0,  # type: ignore[arg-type]
                  generator=torch.Generator().manual_seed(3))
    assert torch.equal(run1, run2)
    torch.testing.assert_close(run1.double(), target, atol=2e-4, rtol=0)
    for x0 in x0s:  # the x0 estimate stays on the target at every step
        torch.testing.assert_close(x0.double(), target, atol=2e-4, rtol=0)
    # Started on the target's own trajectory, DDIM stays there: x_prev == q(x_{i-1} | target, eps).
    trace = SampleTrace()
    sample(model, x_T, sched, sampler="ddim", prediction=prediction, trace=trace)  # type: ignore[arg-type]
    eps0 = (x_T.double() - sched.sqrt_alphas_cumprod.double()[-1] * target) / sched.sqrt_one_minus_alphas_cumprod.double()[-1]
    i = 10
    k = sched.num_steps - 1 - i
    expected = sched.sqrt_alphas_cumprod.double()[i - 1] * target + sched.sqrt_one_minus_alphas_cumprod.double()[i - 1] * eps0
    torch.testing.assert_close(trace.x_prev[k].double(), expected, atol=2e-4, rtol=0)


def test_ddpm_oracle_and_noise_injection() -> None:
    target = torch.randn(1, 4, 6, 6, dtype=torch.float64)
    model = _OracleDenoiser(target, "eps")
    sched = make_schedule(10)
    x_T = torch.randn(1, 4, 6, 6)
    noises = torch.randn(10, 4, 6, 6)
    a = sample(model, x_T, sched, noises=noises)
    b = sample(model, x_T, sched, noises=list(noises[:9]))  # the last noise is never used
    torch.testing.assert_close(a, b, atol=0, rtol=0)
    torch.testing.assert_close(a.double(), target, atol=1e-4, rtol=0)
    g1 = sample(model, x_T, sched, generator=torch.Generator().manual_seed(7))
    g2 = sample(model, x_T, sched, generator=torch.Generator().manual_seed(7))
    assert torch.equal(g1, g2)
    with pytest.raises(Cancelled):
        sample(model, x_T, sched, cancel=lambda: True)
