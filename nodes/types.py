"""The pack's socket types (one per model family, so the graph refuses a wrong connection) and shared input declarations."""

from __future__ import annotations

from comfy_api.latest import io

FeMaSRModel = io.Custom("REALSR_FEMASR_MODEL")
MMRealSRModel = io.Custom("REALSR_MMREALSR_MODEL")
StableSRModule = io.Custom("REALSR_STABLESR_MODULE")
CFWVae = io.Custom("REALSR_CFW_VAE")
# Any feed-forward SR model of the pack (FeMaSR, MM-RealSR, CRL-SR): the generic upscale node, LWay.
SRModel = io.Custom("REALSR_MODEL")
# LWay's frozen LR-reconstruction branch (degradation encoder E + reconstructor R).
LWayModule = io.Custom("REALSR_LWAY_MODULE")
FEED_FORWARD = ("femasr", "mmrealsr", "crlsr")

CATEGORY = "image/upscaling/RealSR"
PREFIX = "RealSR_"

# Loader outputs, in socket order: (core architecture id(s), socket type, label).  New families are
# appended so saved workflows keep their links.
LOADER_OUTPUTS = [
    ("femasr", FeMaSRModel, "FeMaSR"),
    ("mmrealsr", MMRealSRModel, "MM-RealSR"),
    ("stablesr", StableSRModule, "StableSR"),
    ("stablesr_cfw", CFWVae, "CFW VAE"),
    (FEED_FORWARD, SRModel, "SR model"),
    ("lway", LWayModule, "LWay module"),
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
