"""Color Fix: give an image the colours of a reference (StableSR's wavelet or AdaIN correction)."""

from __future__ import annotations

import comfy.model_management as mm
from comfy_api.latest import io

from ..realsr_core import color_fix
from .types import CATEGORY, PREFIX


class ColorFix(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id=f"{PREFIX}ColorFix",
            display_name="Color Fix",
            category=CATEGORY,
            description="Corrects colour shifts of an upscaled image against a reference, usually the "
            "low-resolution input: wavelet keeps the image's detail and takes the reference's low "
            "frequencies; AdaIN matches per-channel mean and spread.",
            inputs=[
                io.Image.Input("image", tooltip="The image to correct, e.g. the upscaler's output."),
                io.Image.Input("reference", tooltip="The colours to match, e.g. the original image; resized "
                               "to the image's size. One reference serves a whole batch."),
                io.Combo.Input("method", options=["wavelet", "adain"], default="wavelet",
                               tooltip="wavelet: 5-level wavelet low-band swap (best for SR); adain: "
                               "per-channel mean/std matching."),
                io.Float.Input("strength", default=1.0, min=0.0, max=1.0, step=0.05,
                               tooltip="Blend between the input (0) and the corrected image (1)."),
            ],
            outputs=[io.Image.Output(display_name="image", tooltip="The colour-corrected images.")],
        )

    @classmethod
    def execute(cls, image, reference, method: str, strength: float) -> io.NodeOutput:
        out = color_fix(image.movedim(-1, 1), reference.movedim(-1, 1).to(image.device), method=method,
                        strength=strength)
        return io.NodeOutput(out.clamp(0, 1).movedim(1, -1).to(mm.intermediate_device()))
