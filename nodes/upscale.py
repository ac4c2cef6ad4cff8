"""RealSR Upscale: any feed-forward SR model of the pack (the shipped CRL-SR x4 by default workflow)."""

from __future__ import annotations

from comfy_api.latest import io

from . import host
from .types import CATEGORY, FEED_FORWARD, PREFIX, SRModel, tile_inputs


class RealSRUpscale(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id=f"{PREFIX}Upscale",
            display_name="RealSR Upscale",
            category=CATEGORY,
            description="Upscales images with any feed-forward model of the pack (CRL-SR, FeMaSR, MM-RealSR with "
            "estimated scores, ESRGAN / Real-ESRGAN from .pth, .safetensors or ncnn files), tile by tile. The "
            "shipped CRL-SR x4 model needs no download.",
            inputs=[
                SRModel.Input("model", tooltip="The 'SR model' output of 'Load RealSR Model' (e.g. "
                              "built-in/crlsr_x4.safetensors)."),
                io.Image.Input("image", tooltip="Images to upscale (RGB, RGBA or gray)."),
                *tile_inputs(),
            ],
            outputs=[io.Image.Output(display_name="image", tooltip="The upscaled images.")],
        )

    @classmethod
    def execute(cls, model, image, tile_size: str, overlap: int) -> io.NodeOutput:
        model = host.require(model, FEED_FORWARD, "RealSR Upscale")
        out, _ = host.run_upscale(model, image, tile=tile_size, overlap=overlap)
        return io.NodeOutput(out)
