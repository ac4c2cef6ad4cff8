"""StableSR as an img2img script of the webui (Forge and AUTOMATIC1111): "StableSR" in the Script menu, or
``/sdapi/v1/img2img`` with ``script_name: "stablesr"`` and ``script_args`` in the order of :data:`ARGS`.

The core engine (:func:`realsr_core.diffusion.engine.run_stablesr`) runs the method; this file supplies its
backends on the host's loaded SD 2.x model:

* sampling: the host's UNet module, its ResBlocks modulated by the module's SFT layers at instance level
  (:func:`~realsr_core.models.stablesr.attach_sft`, undone in ``finally``: finish, error or Interrupt), driven
  by the official canvas sampler (DDPM / DDIM) or by the webui's k-diffusion sampler
  (:class:`~realsr_core.diffusion.kdiffusion.KDiffusionSampler`); both aggregate the official Gaussian
  tiles at every step, so no Tiled Diffusion extension is needed;
* VAE and text: the checkpoint's own VAE and OpenCLIP tower read from its file (only those tensors), so the
  script gives the core command line's image on the same file and seed; v-prediction is read from the
  weights (Forge takes a 768-v file for eps without its .yaml).
"""

from __future__ import annotations

import os

import gradio as gr
import torch
from modules import processing, scripts, sd_samplers_kdiffusion, shared
from PIL import Image

from realsr_core import load_model
from realsr_core.diffusion.engine import CoreSampler, CoreVAE, StableSROptions, run_stablesr
from realsr_core.diffusion.kdiffusion import KDiffusionSampler
from realsr_core.errors import Cancelled, InvalidInputError
from realsr_core.models.stablesr import attach_sft, resblock_channels
from realsr_core.models.stablesr.sd import check_module_fits, load_sd

from . import host

OFFICIAL, DDIM, WEBUI = "StableSR DDPM (official)", "DDIM", "webui sampler (Sampling method, CFG, prompts)"
NONE = "None"
ARGS = ["module", "cfw", "upscale", "sampler", "steps", "tile_size", "tile_overlap", "start", "color_fix",
        "color_fix_strength", "cfw_weight", "tiled_vae"]
_cache: dict[str, tuple[str, object]] = {}  # "module" / "cfw" -> (path, descriptor): one of each kept loaded
# ((checkpoint path, mtime), prompt) -> (1, 77, D) text context on the CPU, for the current checkpoint only: the
# text tower (1.4 GB) is read from the file only for a prompt not seen before.
_contexts: dict[tuple[tuple[str, float], str], torch.Tensor] = {}


def _load(kind: str, name: str, arch: str):
    path = str(host.find_model_file(name))
    if kind in _cache and _cache[kind][0] == path:
        return _cache[kind][1]
    _cache.pop(kind, None)
    host.free_memory()
    desc = load_model(path)
    if desc.arch != arch:
        wanted = "a StableSR module (stablesr_000117.ckpt, webui_768v_139.ckpt, stablesr_turbo.ckpt)" \
            if arch == "stablesr" else "StableSR's CFW VAE (vqgan_cfw_00011.ckpt)"
        raise InvalidInputError(f"{name} is a {desc.name}, not {wanted}")
    _cache[kind] = (path, desc)
    return desc


def host_unet() -> tuple[object, torch.nn.Module, torch.dtype]:
    """The selected SD model (loaded now if the host loads lazily), its UNet module and its compute dtype."""
    from modules import sd_models

    if hasattr(sd_models, "forge_model_reload"):  # Forge loads the selected checkpoint when a job needs it
        from backend import memory_management

        sd_model = sd_models.forge_model_reload()[0]
        patcher = sd_model.forge_objects.unet  # a ComfyUI-style patcher, put on the GPU by Forge's manager
        memory_management.load_model_gpu(patcher)
        return sd_model, patcher.model.diffusion_model, getattr(patcher.model, "computation_dtype", torch.float32)
    sd_model = shared.sd_model  # AUTOMATIC1111: ldm's LatentDiffusion (loaded on first access)
    unet = sd_model.model.diffusion_model
    return sd_model, unet, next(unet.parameters()).dtype


def webui_sampler(name: str):
    """The k-diffusion function of the webui sampler called ``name`` (its label or an alias)."""
    import k_diffusion.sampling

    for label, funcname, aliases, _options in sd_samplers_kdiffusion.samplers_k_diffusion:
        if name == label or name in aliases:
            return funcname if callable(funcname) else getattr(k_diffusion.sampling, funcname)
    labels = [s[0] for s in sd_samplers_kdiffusion.samplers_k_diffusion]
    raise InvalidInputError(f"StableSR runs the webui's k-diffusion samplers; {name!r} is not one of {labels}")


def run(p, module: str, cfw: str, upscale: float, sampler: str, steps: int, tile_size: int, tile_overlap: int,
        start: str, color_fix: str, color_fix_strength: float, cfw_weight: float, tiled_vae: str) -> Image.Image:
    """StableSR on ``p.init_images[0]`` with the host's loaded model; raises on a bad input, before any work."""
    if not p.init_images:
        raise InvalidInputError("StableSR needs an input image (img2img)")
    if sampler not in (OFFICIAL, DDIM, WEBUI):
        raise InvalidInputError(f"StableSR sampler must be one of {[OFFICIAL, DDIM, WEBUI]}, got {sampler!r}")
    options = StableSROptions(upscale=float(upscale), steps=int(steps), seed=int(p.seed), start=start,
                              tile_size=int(tile_size), tile_overlap=int(tile_overlap), color_fix=color_fix,
                              color_fix_strength=float(color_fix_strength), cfw_weight=float(cfw_weight),
                              tiled_vae=tiled_vae)
    options.check()
    k_sampler = webui_sampler(p.sampler_name) if sampler == WEBUI else None
    sr = _load("module", module, "stablesr")
    cfw_desc = _load("cfw", cfw, "stablesr_cfw") if cfw and cfw != NONE else None
    sd_model, unet, dtype = host_unet()
    check_module_fits(sr.model, resblock_channels(unet))
    device = next(unet.parameters()).device
    # The checkpoint's VAE and text contexts, read from its file (the UNet is the host's): refuses SD 1.x / XL.
    path = sd_model.sd_checkpoint_info.filename
    prompts = ("", None) if k_sampler is None else (p.prompt, p.negative_prompt)
    key = (path, os.path.getmtime(path))
    missing = [t for t in prompts if t is not None and (key, t) not in _contexts]
    sd = load_sd(path, unet=False, text=bool(missing), device=device)
    if missing:
        for k in [k for k in _contexts if k[0] != key]:  # contexts of another checkpoint
            del _contexts[k]
        for t in missing:
            _contexts[(key, t)] = sd.context(t, "cpu")
        sd.text = None  # 1.4 GB: read again only for a new prompt
    context, uncond = (None if t is None else _contexts[(key, t)].to(device, dtype) for t in prompts)
    sr.to(device, dtype)
    if cfw_desc is not None:
        cfw_desc.to(device, torch.float32)
    image = host.to_tensor(p.init_images[0])
    cond: list = [None]

    def unet_fn(x: torch.Tensor, t: torch.Tensor, ctx: torch.Tensor | None, c: object, _sft: object) -> torch.Tensor:
        cond[0] = c  # read by the SFT-modulated ResBlocks during this call
        try:
            # A fresh transformer_options per call: Forge's UNet writes into it (its default is a shared dict);
            # ldm's UNet (AUTOMATIC1111) takes and ignores it.
            return unet(x, t, context=ctx, transformer_options={})
        finally:
            cond[0] = None

    kw = dict(prediction=sd.prediction, steps=options.steps, seed=options.seed, start=options.start, device=device,
              dtype=dtype, progress=host.progress("StableSR"), cancel=host.cancelled)
    if k_sampler is not None:
        sample = KDiffusionSampler(k_sampler, unet_fn, sr.model.encoder, sr.model.sft_layers, context, uncond,
                                   cfg=float(p.cfg_scale), **kw)
    else:
        sample = CoreSampler(unet_fn, sr.model.encoder, sr.model.sft_layers, context,
                             sampler="ddpm" if sampler == OFFICIAL else "ddim", **kw)
    shared.state.job_count = 1
    detach = attach_sft(unet, sr.model.sft_layers, lambda: cond[0])
    try:
        with torch.no_grad():
            out, _ = run_stablesr(image, vae=CoreVAE(sd.vae, cfw_desc, progress=host.progress("StableSR VAE"),
                                                     cancel=host.cancelled),
                                  sample=sample, prediction=sd.prediction, options=options)
    finally:
        detach()  # the next plain img2img runs the UNet exactly as before
        del sd
        host.free_memory()
    return host.to_image(out)


class StableSRScript(scripts.Script):
    def title(self) -> str:
        return "StableSR"

    def show(self, is_img2img: bool) -> bool:
        return is_img2img

    def ui(self, is_img2img: bool) -> list:
        modules = [f.name for f in host.files_of("stablesr")]
        cfws = [NONE] + [f.name for f in host.files_of("stablesr_cfw")]
        module = gr.Dropdown(modules, value=modules[0] if modules else None, label="StableSR module (models/RealSR)")
        cfw = gr.Dropdown(cfws, value=NONE, label="CFW VAE (models/RealSR; None = the checkpoint's VAE)")
        with gr.Row():
            upscale = gr.Slider(1.0, 8.0, 4.0, step=0.5, label="Upscale factor")
            sampler = gr.Dropdown([OFFICIAL, DDIM, WEBUI], value=OFFICIAL, label="Sampler")
            steps = gr.Slider(1, 1000, 200, step=1, label="Steps (official 200; turbo module 4)")
        with gr.Row():
            tile = gr.Slider(0, 256, 0, step=8, label="Latent tile (0 = official: 64, 96 for 768-v)")
            overlap = gr.Slider(0, 128, 0, step=4, label="Tile overlap (0 = official: 32, 48 for 768-v)")
            start = gr.Radio(["lr_latent", "noise"], value="lr_latent", label="Start from")
        with gr.Row():
            color_fix = gr.Radio(["wavelet", "adain", "none"], value="wavelet", label="Colour fix")
            strength = gr.Slider(0.0, 1.0, 1.0, step=0.05, label="Colour fix strength")
            cfw_weight = gr.Slider(0.0, 1.0, 0.5, step=0.05, label="CFW weight (with a CFW VAE)")
            tiled_vae = gr.Radio(["auto", "on", "off"], value="auto", label="Tiled VAE")
        return [module, cfw, upscale, sampler, steps, tile, overlap, start, color_fix, strength, cfw_weight, tiled_vae]

    def run(self, p, *args) -> processing.Processed:
        processing.fix_seed(p)
        try:
            with host.same_host_rng():
                image = run(p, *args)
        except Cancelled:
            # No image; the note travels in the infotexts (the API's "info" JSON), which an empty list would drop.
            return processing.Processed(p, [], p.seed, "StableSR: interrupted", infotexts=["StableSR: interrupted"])
        info = "StableSR: " + ", ".join(f"{k} {v}" for k, v in zip(ARGS, args, strict=False)) + f", seed {p.seed}"
        if not p.do_not_save_samples:
            from modules import images

            images.save_image(image, p.outpath_samples, "", p.seed, p.prompt, shared.opts.samples_format, info=info, p=p)
        return processing.Processed(p, [image], p.seed, info)
