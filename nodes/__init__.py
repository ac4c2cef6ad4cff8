"""ComfyUI V3 adapters over ``realsr_core`` (imported only inside ComfyUI)."""

from __future__ import annotations

from comfy_api.latest import ComfyExtension, io

from . import host
from .colorfix import ColorFix
from .femasr import FeMaSRUpscale
from .loaders import LoadRealSRModel
from .lway import LWayFinetune, LWayFinetuneUpscaleModel
from .mmrealsr import MMRealSRModulate
from .stablesr import StableSRSampler
from .upscale import RealSRUpscale

host.register_model_folder()  # before any define_schema lists the folder's files

NODES: list[type[io.ComfyNode]] = [LoadRealSRModel, RealSRUpscale, FeMaSRUpscale, MMRealSRModulate, ColorFix,
                                   StableSRSampler, LWayFinetune, LWayFinetuneUpscaleModel]


class RealSRExtension(ComfyExtension):
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return NODES
