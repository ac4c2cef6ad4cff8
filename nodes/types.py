"""The pack's socket types (one per model family, so the graph refuses a wrong connection) and shared input declarations."""

from __future__ import annotations

from comfy_api.latest import io

FeMaSRModel = io.Custom("REALSR_FEMASR_MODEL")
MMRealSRModel = io.Custom("REALSR_MMREALSR_MODEL")
StableSRModule = io.Custom("REALSR_STABLESR_MODULE")
CFWVae = io.Custom("REALSR_CFW_VAE")
# Any feed-forward SR model of the pack (FeMaSR, MM-RealSR, CRL-SR, ESRGAN / Real-ESRGAN incl. the compact net):
# the generic upscale node, LWay.
SRModel = io.Custom("REALSR_MODEL")
# LWay's frozen LR-reconstruction branch (degradation encoder E + reconstructor R).
LWayModule = io.Custom("REALSR_LWAY_MODULE")
FEED_FORWARD = ("femasr", "mmrealsr", "crlsr", "esrgan", "compact")
# The families ComfyUI's spandrel reads too: the loader's UPSCALE_MODEL output (host.spandrel_model).
SPANDREL = ("esrgan", "compact")

CATEGORY = "image/upscaling/RealSR"
PREFIX = "RealSR_"

# Loader outputs, in socket order: (core architecture id(s), socket type, label, tooltip).  New outputs are
# appended so saved workflows keep their links.
LOADER_OUTPUTS = [
    ("femasr", FeMaSRModel, "FeMaSR", "The model when the file is FeMaSR."),
    ("mmrealsr", MMRealSRModel, "MM-RealSR", "The model when the file is MM-RealSR."),
    ("stablesr", StableSRModule, "StableSR", "The model when the file is StableSR."),
    ("stablesr_cfw", CFWVae, "CFW VAE", "The model when the file is CFW VAE."),
    (FEED_FORWARD, SRModel, "SR model",
     "The model when the file is a feed-forward upscaler (FeMaSR, MM-RealSR, CRL-SR, ESRGAN / Real-ESRGAN incl. "
     "the compact and ncnn files): for 'RealSR Upscale' and 'LWay Fine-tune (RealSR model)'."),
    ("lway", LWayModule, "LWay module", "The model when the file is LWay module."),
    (SPANDREL, io.UpscaleModel, "UPSCALE_MODEL",
     "ESRGAN / Real-ESRGAN files (.pth, .safetensors, ncnn .param) as ComfyUI's 'Load Upscale Model' gives them "
     "(spandrel), for 'Upscale Image (using Model)'. Not for the ncnn realesr-animevideov3-x2/x3 files: they are "
     "the x4 network plus an output resize that ComfyUI's node cannot apply, so it refuses them (use 'SR model')."),
]

# The tile_size choices of the feed-forward upscale nodes (host.parse_tile turns one into the core's tile).
TILE_CHOICES = ["auto", "none", "128", "192", "256", "320", "384", "512", "768", "1024"]


def tile_inputs() -> list[io.Input]:
    """Tile size and overlap, shared by the feed-forward upscale nodes."""
    return [
        io.Combo.Input("tile_size", options=TILE_CHOICES, default="auto",
                       tooltip="Input tile size in pixels. 'auto' picks the largest that fits free memory; "
                       "'none' runs the whole image at once. Out of memory halves it automatically."),
        io.Int.Input("overlap", default=16, min=0, max=256, step=8,
                     tooltip="Input pixels shared and feather-blended between neighbouring tiles."),
    ]
