"""FeMaSR Upscale: IMAGE in, IMAGE out, tiled."""

from __future__ import annotations

from comfy_api.latest import io

from . import host
from .types import CATEGORY, PREFIX, FeMaSRModel, tile_inputs


class FeMaSRUpscale(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id=f"{PREFIX}FeMaSRUpscale",
            display_name="FeMaSR Upscale",
            category=CATEGORY,
            description="Real-world super-resolution by feature matching with a high-resolution VQGAN prior "
            "(FeMaSR, x2 or x4 depending on the model).",
            inputs=[
                FeMaSRModel.Input("model", tooltip="A FeMaSR model from 'Load RealSR Model'."),
                io.Image.Input("image", tooltip="Images to upscale (RGB, RGBA or gray)."),
                *tile_inputs(),
            ],
            outputs=[io.Image.Output(display_name="image", tooltip="The upscaled images.")],
        )

    @classmethod
    def execute(cls, model, image, tile_size: str, overlap: int) -> io.NodeOutput:
        model = host.require(model, "femasr", "FeMaSR Upscale")
        out, _ = host.run_upscale(model, image, tile=tile_size, overlap=overlap)
        return io.NodeOutput(out)
