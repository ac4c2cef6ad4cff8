"""StableSR inside ComfyUI's own sampling: SFT injection, LR latent as conditioning, per-step tiling.

ComfyUI glue only; the method lives in ``realsr_core`` (SFT forward, time-aware encoder, respaced
DDPM, tile plan and weights).  Everything is attached to a *clone* of the host MODEL:

* the StableSR module rides along as an additional model (loaded / offloaded with the UNet);
* an injection sets an instance ``_forward`` on each modulated ResBlock while the clone is loaded
  and deletes it on ejection (the class method is untouched: no global monkeypatching);
* the scaled LR latent travels as a ``CONDNoiseShape`` model cond, so ComfyUI batches it with cond /
  uncond, crops it with every area and hands it to the diffusion model as a keyword argument;
* a DIFFUSION_MODEL wrapper runs the time-aware encoder on that crop for each UNet call;
* a CALC_COND_BATCH wrapper splits each cond into the official canvas tiles (area + Gaussian mask),
  so ComfyUI's ``_calc_cond_batch`` runs and blends the tiles: ``sum(x0 * W) / sum(W)``.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from typing import Any

import comfy.conds
import comfy.model_management as mm
import comfy.model_patcher
import comfy.sample
import comfy.samplers
import comfy.utils
import latent_preview
import torch
from comfy.patcher_extension import PatcherInjection, WrappersMP
from torch import Tensor, nn

from ..realsr_core.diffusion import make_schedule, plan_latent_tiles
from ..realsr_core.diffusion.engine import (
    TILED_VAE_AUTO_PIXELS,
    VAE_DECODE_CONTEXT,
    VAE_DECODE_OVERLAP,
    VAE_DECODE_TILE,
    VAE_ENCODE_CONTEXT,
    VAE_ENCODE_OVERLAP,
    VAE_ENCODE_TILE,
    StableSROptions,
    run_stablesr,
)
from ..realsr_core.diffusion.ve import ddpm_ve_sigmas, lr_start_ve, sample_ddpm_ve
from ..realsr_core.models.stablesr import StableSRModule, attach_sft, resblock_channels
from ..realsr_core.models.stablesr.sd import check_module_fits
from ..realsr_core.tiling import (
    ProgressFn,
    gaussian_weights,
    tiled_decode,
    tiled_encode,
    tiled_vae_decode,
    tiled_vae_encode,
)
from .host import RealSRModel, interrupt_check
from .host import offload as host_offload

log = logging.getLogger(__name__)

KEY = "realsr_stablesr"
LR_COND = "realsr_stablesr_lr"
SAMPLER_DDPM = "stablesr_ddpm"
STARTS = ["lr_latent", "noise"]
COLOR_FIXES = ["wavelet", "adain", "none"]
TILED_VAE = ["auto", "on", "off"]


# ---------------------------------------------------------------------------- model patching
class _SFTState:
    """The condition of the UNet call in progress (None outside a StableSR call: blocks run plain)."""

    __slots__ = ("cond",)

    def __init__(self) -> None:
        self.cond: Any = None


def check_fit(unet: nn.Module, module: StableSRModule) -> None:
    """Raise a clear error when the module's SFT layers do not match the MODEL's UNet."""
    check_module_fits(module, resblock_channels(unet))


def _injection(module: StableSRModule, state: _SFTState) -> PatcherInjection:
    detach: list[Callable[[], None]] = []

    def inject(patcher: comfy.model_patcher.ModelPatcher) -> None:
        detach.append(attach_sft(patcher.model.diffusion_model, module.sft_layers, lambda: state.cond))

    def eject(patcher: comfy.model_patcher.ModelPatcher) -> None:
        while detach:
            detach.pop()()

    return PatcherInjection(inject=inject, eject=eject)


def _diffusion_wrapper(module: StableSRModule, state: _SFTState) -> Callable[..., Tensor]:
    def wrapper(executor, x, timesteps, context, y, control, transformer_options, **kwargs):
        lr = kwargs.pop(LR_COND, None)
        mm.throw_exception_if_processing_interrupted()  # once per UNet call = per tile batch
        if lr is None:
            return executor(x, timesteps, context, y, control, transformer_options, **kwargs)
        p = next(module.parameters())
        if p.device != x.device:  # a low-VRAM partial load leaves plain nn.Modules where they are
            module.to(x.device)
        # ``timesteps`` are the discrete 0..999 model timesteps (the official ori_timesteps); the LR
        # latent is cropped and batched exactly like x (cond / uncond chunks, tiles).
        state.cond = module.encoder.forward_by_shape(lr, timesteps)
        try:
            return executor(x, timesteps, context, y, control, transformer_options, **kwargs)
        finally:
            state.cond = None

    return wrapper


class _Tiler:
    """CALC_COND_BATCH wrapper: one cond copy per official canvas tile, Gaussian weights as its mask."""

    def __init__(self, tile: int, overlap: int) -> None:
        self.tile, self.overlap = tile, overlap
        self._cache: dict[tuple, tuple[Any, list[Tensor]]] = {}

    def plan_and_masks(self, height: int, width: int, device: torch.device):
        key = (height, width, str(device))
        if key not in self._cache:
            plan = plan_latent_tiles(height, width, self.tile, self.overlap)
            w = gaussian_weights(plan.tile_h, plan.tile_w, dtype=torch.float32).to(device)
            masks = []
            for y0, y1, x0, x1 in plan.tiles:
                m = torch.zeros((1, height, width), dtype=torch.float32, device=device)
                m[0, y0:y1, x0:x1] = w
                masks.append(m)
            self._cache = {key: (plan, masks)}  # one canvas size per run
        return self._cache[key]

    def split(self, conds: list[dict] | None, plan, masks: list[Tensor]) -> list[dict] | None:
        if conds is None:
            return None
        out: list[dict] = []
        for c in conds:
            # A cond that already has its own area or mask (regional prompting) or is a "default" cond
            # stays untiled: its region is the user's, and nesting our tiles in it is not defined.
            if LR_COND not in c.get("model_conds", {}) or "area" in c or "mask" in c or "default" in c:
                out.append(c)
                continue
            for (y0, y1, x0, x1), mask in zip(plan.tiles, masks, strict=True):
                t = c.copy()
                # get_area_and_mult: crops x, the mask and every model cond (our LR latent) to the area;
                # with a mask there is no edge feathering, so mult = the Gaussian weights of the tile.
                t["area"] = (y1 - y0, x1 - x0, y0, x0)
                t["mask"] = mask
                t["mask_strength"] = 1.0
                out.append(t)
        return out

    def __call__(self, executor, model, conds, x_in, timestep, model_options):
        plan, masks = self.plan_and_masks(int(x_in.shape[-2]), int(x_in.shape[-1]), x_in.device)
        if len(plan) > 1:
            conds = [self.split(c, plan, masks) for c in conds]
        return executor(model, conds, x_in, timestep, model_options)


def patch_model(model: comfy.model_patcher.ModelPatcher, sr: RealSRModel, tile: int, overlap: int):
    """A clone of the host MODEL that samples with StableSR (the input MODEL is not changed)."""
    module: StableSRModule = sr.desc.model
    check_fit(model.model.diffusion_model, module)
    m = model.clone()
    state = _SFTState()
    m.set_additional_models(KEY, [sr.patcher])
    m.set_injections(KEY, [_injection(module, state)])
    m.add_wrapper_with_key(WrappersMP.DIFFUSION_MODEL, KEY, _diffusion_wrapper(module, state))
    m.add_wrapper_with_key(WrappersMP.CALC_COND_BATCH, KEY, _Tiler(tile, overlap))
    return m


# ---------------------------------------------------------------------------- conditioning
def is_v_prediction(model: comfy.model_patcher.ModelPatcher) -> bool:
    import comfy.model_sampling as ms

    return isinstance(model.get_model_object("model_sampling"), ms.V_PREDICTION)


def empty_conditioning(model: comfy.model_patcher.ModelPatcher) -> list:
    """An all-zero context of the UNet's width (77 tokens); not the official empty prompt."""
    dim = model.model.model_config.unet_config.get("context_dim") or 1024
    return [[torch.zeros((1, 77, int(dim))), {}]]


def with_lr_latent(conditioning: list, scaled_lr: Tensor) -> list:
    """Copies of the conditioning whose model conds carry the scaled LR latent."""
    out = []
    for emb, opts in conditioning:
        opts = opts.copy()
        mc = dict(opts.get("model_conds", {}))
        mc[LR_COND] = comfy.conds.CONDNoiseShape(scaled_lr)
        opts["model_conds"] = mc
        out.append([emb, opts])
    return out


# ---------------------------------------------------------------------------- the engine's VAE backend
def use_tiled_vae(mode: str, vae, padded: Tensor) -> bool:
    """Whether to run the VAE (and CFW) tile by tile with shared GroupNorm statistics."""
    if mode not in TILED_VAE:
        raise ValueError(f"tiled_vae must be one of {TILED_VAE}, got {mode!r}")
    if mode != "auto":
        return mode == "on"
    h, w = padded.shape[-2:]
    if h * w > TILED_VAE_AUTO_PIXELS:
        return True
    latent_shape = (1, 4, h // 8, w // 8)
    need = vae.memory_used_decode(latent_shape, vae.vae_dtype)
    return need > mm.get_free_memory(vae.device)


def _tile_progress(total_hint: int = 1) -> ProgressFn:
    pbar = comfy.utils.ProgressBar(total_hint)
    return lambda done, total: pbar.update_absolute(done, total)


def encode(vae, padded: Tensor, tiled: bool = False) -> Tensor:
    """VAE encode of NCHW [0,1] pixels -> the unscaled latent (ComfyUI's LATENT convention).

    ``tiled``: 512 px windows with shared GroupNorm statistics (:mod:`realsr_core.tiling.vae`),
    so memory stays that of one window whatever the image size; otherwise ComfyUI's own whole-image encode.
    """
    if not tiled:
        return vae.encode(padded.movedim(1, -1))
    fsm = vae.first_stage_model
    win = VAE_ENCODE_TILE + 2 * VAE_ENCODE_CONTEXT
    mm.load_models_gpu([vae.patcher], memory_required=vae.memory_used_encode((1, 3, win, win), vae.vae_dtype))

    def fn(x: Tensor) -> Tensor:
        return fsm.encode(vae.process_input(x).to(vae.vae_dtype)).float()

    return tiled_encode(fn, fsm.encoder, padded.float(), VAE_ENCODE_TILE, VAE_ENCODE_OVERLAP,
                        context=VAE_ENCODE_CONTEXT, device=vae.device, output_device=mm.intermediate_device(),
                        out_dtype=torch.float32, progress=_tile_progress(), cancel=interrupt_check)


def decode_vae(vae, samples: Tensor, tiled: bool) -> Tensor:
    """VAE decode of an unscaled latent -> NCHW [0,1]; tiled as in :func:`encode` (64 latent px windows)."""
    if not tiled:
        img = vae.decode(samples)
        if img.ndim == 5:  # video VAEs return [B, T, H, W, C]
            img = img.reshape(-1, *img.shape[-3:])
        return img.movedim(-1, 1)
    fsm = vae.first_stage_model
    win = VAE_DECODE_TILE + 2 * VAE_DECODE_CONTEXT
    mm.load_models_gpu([vae.patcher], memory_required=vae.memory_used_decode((1, 4, win, win), vae.vae_dtype))

    def fn(z: Tensor) -> Tensor:
        return fsm.decode(z.to(vae.vae_dtype)).float()

    out = tiled_decode(fn, fsm.decoder, samples.float(), VAE_DECODE_TILE, VAE_DECODE_OVERLAP,
                       context=VAE_DECODE_CONTEXT, device=vae.device, output_device=mm.intermediate_device(),
                       out_dtype=torch.float32, progress=_tile_progress(), cancel=interrupt_check)
    return vae.process_output(out)


def sample(
    m: comfy.model_patcher.ModelPatcher,
    latent: Tensor,
    positive: list,
    negative: list,
    *,
    seed: int,
    steps: int,
    cfg: float,
    sampler_name: str,
    scheduler: str,
    start: str,
    start_noise: Tensor | None = None,
    step_noises: Tensor | None = None,
) -> Tensor:
    """Sample the patched clone from the LR latent; returns the unscaled latent (intermediate device).

    ``start_noise`` / ``step_noises`` replace the seeded draws (tests, parity with the official run).
    """
    scaled = m.model.process_latent_in(latent.float())
    pos = with_lr_latent(positive, scaled)
    neg = with_lr_latent(negative, scaled)
    gen = torch.Generator(device="cpu").manual_seed(int(seed))
    eps = torch.randn(latent.shape, generator=gen, dtype=torch.float32) if start_noise is None else start_noise
    ddpm = sampler_name == SAMPLER_DDPM
    if ddpm:
        sigmas = ddpm_ve_sigmas(make_schedule(steps))
    else:
        sigmas = comfy.samplers.KSampler(m, steps=steps, device=m.load_device, sampler=sampler_name,
                                         scheduler=scheduler, denoise=1.0, model_options=m.model_options).sigmas
    if start == "lr_latent":
        # After process_latent_in and noise_scaling(zero noise) ComfyUI's sampler starts at exactly
        # z_lr + sigma_0 * eps, the VE form of the official q_sample(z_lr, 999).
        latent_image = m.model.process_latent_out(lr_start_ve(scaled, eps.to(scaled.device), float(sigmas[0])))
        noise = torch.zeros_like(latent_image)
    else:
        latent_image = torch.zeros_like(latent)
        noise = eps
    callback = latent_preview.prepare_callback(m, len(sigmas) - 1)
    disable_pbar = not comfy.utils.PROGRESS_BAR_ENABLED
    if ddpm:
        fn = functools.partial(_ddpm_function, generator=gen, noises=step_noises)
        sampler = comfy.samplers.KSAMPLER(fn)
        return comfy.sample.sample_custom(m, noise, cfg, sampler, sigmas, pos, neg, latent_image,
                                          callback=callback, disable_pbar=disable_pbar, seed=seed)
    return comfy.sample.sample(m, noise, steps, cfg, sampler_name, scheduler, pos, neg, latent_image,
                               denoise=1.0, callback=callback, disable_pbar=disable_pbar, seed=seed)


def _ddpm_function(model, x, sigmas, extra_args=None, callback=None, disable=None, generator=None, noises=None):
    return sample_ddpm_ve(model, x, sigmas, extra_args=extra_args, callback=callback, disable=disable,
                          generator=generator, noises=noises)


def decode_cfw(cfw: RealSRModel, samples: Tensor, padded: Tensor, weight: float, tiled: bool = False) -> Tensor:
    """CFW decode: the LR image's CFW-encoder features fused into the decoder; NCHW [0,1] (not clamped).

    ``tiled``: encoder features and decoder run window by window with shared GroupNorm statistics; the
    features (96 values per image pixel) are assembled on the intermediate device, not the GPU.
    """
    desc = cfw.desc
    x = padded * 2 - 1
    if tiled:
        return _decode_cfw_tiled(cfw, samples, x, weight)
    need = int(desc.bytes_per_px * x.shape[-2] * x.shape[-1] // (desc.downscale**2))  # per image, latent px
    mm.load_models_gpu([cfw.patcher], memory_required=need, force_full_load=True)
    device = cfw.patcher.load_device
    try:
        outs = []
        for b in range(x.shape[0]):  # one image at a time: the fusion features are large
            mm.throw_exception_if_processing_interrupted()
            xb = x[b : b + 1].to(device=device, dtype=desc.dtype)
            feats = desc.encode(xb, return_features=True)[2]
            zb = samples[b : b + 1].to(device=device, dtype=desc.dtype)
            outs.append(desc.decode(zb, feats, weight).float().to(mm.intermediate_device()))
    finally:
        host_offload(cfw.patcher)
    return (torch.cat(outs) + 1) / 2


def _decode_cfw_tiled(cfw: RealSRModel, samples: Tensor, x: Tensor, weight: float) -> Tensor:
    desc = cfw.desc
    win = VAE_DECODE_TILE + 2 * VAE_DECODE_CONTEXT
    mm.load_models_gpu([cfw.patcher], memory_required=int(desc.bytes_per_px * win * win), force_full_load=True)
    try:
        kw = dict(output_device=mm.intermediate_device(), progress=_tile_progress(), cancel=interrupt_check)
        feats = None
        if weight > 0:
            feats = tiled_vae_encode(desc, x, VAE_ENCODE_TILE, VAE_ENCODE_OVERLAP, context=VAE_ENCODE_CONTEXT, **kw)[2]
        out = tiled_vae_decode(desc, samples.float(), feats, weight, VAE_DECODE_TILE, VAE_DECODE_OVERLAP,
                               context=VAE_DECODE_CONTEXT, **kw)
    finally:
        host_offload(cfw.patcher)
    return (out.float() + 1) / 2


class ComfyVAE:
    """The core engine's VAE backend on ComfyUI's VAE (and the pack's CFW VAE when connected)."""

    def __init__(self, vae, cfw: RealSRModel | None) -> None:
        self.vae, self.cfw = vae, cfw

    def use_tiled(self, mode: str, padded: Tensor) -> bool:
        return use_tiled_vae(mode, self.vae, padded)

    def encode(self, padded: Tensor, tiled: bool) -> Tensor:
        return encode(self.vae, padded, tiled)

    def decode(self, latent: Tensor, padded: Tensor, cfw_weight: float, tiled: bool) -> Tensor:
        if self.cfw is not None:
            return decode_cfw(self.cfw, latent, padded, cfw_weight, tiled=tiled)
        return decode_vae(self.vae, latent, tiled)


def run(
    model, sr: RealSRModel, vae, image: Tensor, *, upscale: float, seed: int, steps: int, sampler_name: str,
    scheduler: str, cfg: float, start: str, tile_size: int, tile_overlap: int, color_fix_method: str,
    positive: list | None, negative: list | None, cfw: RealSRModel | None = None, cfw_weight: float = 0.5,
    tiled_vae: str = "auto",
) -> tuple[Tensor, Tensor]:
    """The whole node through the core engine: (IMAGE [B,H,W,3], unscaled latent samples)."""
    positive = positive if positive is not None else empty_conditioning(model)
    negative = negative if negative is not None else empty_conditioning(model)
    check_fit(model.model.diffusion_model, sr.desc.model)

    def sample_with_host(latent: Tensor, tile: int, overlap: int) -> Tensor:
        m = patch_model(model, sr, tile, overlap)
        try:
            return sample(m, latent, positive, negative, seed=seed, steps=steps, cfg=cfg, sampler_name=sampler_name,
                          scheduler=scheduler, start=start)
        finally:
            # The clone may stay cached as loaded; take the SFT hooks off the shared UNet right away.
            m.eject_model()

    options = StableSROptions(upscale=upscale, steps=steps, seed=seed, start=start, tile_size=tile_size,
                              tile_overlap=tile_overlap, color_fix=color_fix_method, cfw_weight=cfw_weight,
                              tiled_vae=tiled_vae)
    with torch.no_grad():
        img, samples = run_stablesr(image.movedim(-1, 1), vae=ComfyVAE(vae, cfw), sample=sample_with_host,
                                    prediction="v" if is_v_prediction(model) else "eps", options=options)
    return img.movedim(1, -1).to(mm.intermediate_device()), samples
