"""StableSR Sampler: diffusion-prior SR on the host's SD 2.1 MODEL with ComfyUI's own sampling."""

from __future__ import annotations

import comfy.samplers
from comfy_api.latest import io

from . import host, stablesr_host
from .types import CATEGORY, PREFIX, CFWVae, StableSRModule


class StableSRSampler(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id=f"{PREFIX}StableSRSampler",
            display_name="StableSR Sampler",
            category=CATEGORY,
            description="Real-world super-resolution with a Stable Diffusion 2.1 prior (StableSR, IJCV 2024): "
            "the image is upscaled, encoded, and sampled with the SD UNet modulated by StableSR's time-aware "
            "encoder and SFT layers, tile by tile at every step (official Gaussian-weighted aggregation).",
            inputs=[
                io.Model.Input("model", tooltip="The SD 2.1 model: 512 (v2-1_512-ema-pruned or the full "
                               "stablesr_000117.ckpt / stablesr_turbo.ckpt) or 768-v for the 768 module."),
                StableSRModule.Input("stablesr", tooltip="The StableSR module from 'Load RealSR Model' "
                                     "(extracted webui module or a full StableSR checkpoint)."),
                io.Vae.Input("vae", tooltip="The SD VAE that encodes the upscaled input and decodes the result."),
                io.Image.Input("image", tooltip="Images to upscale (RGB; alpha is dropped)."),
                io.Float.Input("upscale", default=4.0, min=1.0, max=16.0, step=0.05,
                               tooltip="Output size / input size. The input is bicubic-upscaled by this "
                               "factor before sampling."),
                io.Int.Input("seed", default=0, min=0, max=0xFFFFFFFFFFFFFFFF, control_after_generate=True,
                             tooltip="Seed of the start noise and of the sampler's noise."),
                io.Int.Input("steps", default=200, min=1, max=1000,
                             tooltip="Sampling steps: 200 official, 4 for StableSR-Turbo."),
                io.Combo.Input("sampler_name", options=[stablesr_host.SAMPLER_DDPM, *comfy.samplers.KSampler.SAMPLERS],
                               default=stablesr_host.SAMPLER_DDPM,
                               tooltip="stablesr_ddpm: the official ancestral DDPM on the respaced schedule. "
                               "Any ComfyUI sampler also works (with the scheduler below)."),
                io.Combo.Input("scheduler", options=comfy.samplers.KSampler.SCHEDULERS, default="normal",
                               tooltip="Sigma schedule of ComfyUI samplers; ignored by stablesr_ddpm, which "
                               "uses the official respaced timesteps."),
                io.Float.Input("cfg", default=1.0, min=0.0, max=100.0, step=0.1, round=0.01,
                               tooltip="Classifier-free guidance scale; 1 = no guidance (official). Above 1 "
                               "each step runs the UNet for the negative conditioning too."),
                io.Combo.Input("start", options=stablesr_host.STARTS, default="lr_latent",
                               tooltip="lr_latent: start from the LR latent noised to the first sigma "
                               "(official tiled script); noise: pure noise."),
                io.Int.Input("tile_size", default=0, min=0, max=512, step=8,
                             tooltip="Latent tile of the per-step aggregation (latent px = image px / 8). "
                             "0 = official: 64 for 512 models, 96 for 768-v (v-prediction) models."),
                io.Int.Input("tile_overlap", default=0, min=0, max=256, step=4,
                             tooltip="Latent overlap between tiles; 0 = official: 32 (512) or 48 (768-v)."),
                io.Combo.Input("color_fix", options=stablesr_host.COLOR_FIXES, default="wavelet",
                               tooltip="Colour correction against the upscaled input: wavelet (official "
                               "default), adain, or none."),
                io.Float.Input("cfw_weight", default=0.5, min=0.0, max=1.0, step=0.05,
                               tooltip="Fidelity weight of the CFW decoder (0 = SD decoder, 1 = most "
                               "faithful); used only when a CFW VAE is connected."),
                io.Conditioning.Input("positive", optional=True,
                                      tooltip="Prompt conditioning. Unconnected: an all-zero context "
                                      "(connect CLIP Text Encode of an empty prompt for the official setup)."),
                io.Conditioning.Input("negative", optional=True,
                                      tooltip="Negative conditioning for cfg > 1. Unconnected: an all-zero context."),
                io.Combo.Input("tiled_vae", options=stablesr_host.TILED_VAE, default="auto",
                               tooltip="Encode / decode (and CFW) window by window with GroupNorm statistics "
                               "shared by all windows, so large images neither run out of memory nor show "
                               "tone differences between tiles. auto: above 2 megapixels or when a "
                               "whole-image decode would not fit in free memory."),
                CFWVae.Input("cfw_vae", optional=True,
                             tooltip="Optional CFW VAE (vqgan_cfw_00011.ckpt) from 'Load RealSR Model'."),
            ],
            outputs=[
                io.Image.Output(display_name="image", tooltip="The upscaled, colour-fixed images."),
                io.Latent.Output(display_name="latent", tooltip="The sampled latent (before decoding)."),
            ],
        )

    @classmethod
    def execute(cls, model, stablesr, vae, image, upscale: float, seed: int, steps: int, sampler_name: str,
                scheduler: str, cfg: float, start: str, tile_size: int, tile_overlap: int, color_fix: str,
                cfw_weight: float, tiled_vae: str = "auto", positive=None, negative=None,
                cfw_vae=None) -> io.NodeOutput:
        sr = host.require(stablesr, "stablesr", "StableSR Sampler")
        cfw = host.require(cfw_vae, "stablesr_cfw", "StableSR Sampler") if cfw_vae is not None else None
        out, samples = stablesr_host.run(
            model, sr, vae, image, upscale=upscale, seed=seed, steps=steps, sampler_name=sampler_name,
            scheduler=scheduler, cfg=cfg, start=start, tile_size=tile_size, tile_overlap=tile_overlap,
            color_fix_method=color_fix, positive=positive, negative=negative, cfw=cfw, cfw_weight=cfw_weight,
            tiled_vae=tiled_vae,
        )
        return io.NodeOutput(out, {"samples": samples})
