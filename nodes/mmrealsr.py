"""MM-RealSR Modulate: upscale with (blur, noise) scores, estimated or set, optionally swept."""

from __future__ import annotations

import torch
from comfy_api.latest import io

from . import host
from .types import CATEGORY, PREFIX, MMRealSRModel, tile_inputs


def _score_inputs(name: str, what: str) -> list[io.Input]:
    return [
        io.Combo.Input(f"{name}_mode", options=["auto", "manual"], default="auto",
                       tooltip=f"'auto' uses the model's own {what} estimate (computed once on the whole image); "
                       f"'manual' uses the {name} value below."),
        io.Float.Input(name, default=0.5, min=0.0, max=1.0, step=0.01,
                       tooltip=f"Manual {what} score in [0, 1]: 0 = clean, 1 = heavily degraded "
                       "(stronger restoration, smoother result)."),
    ]


class MMRealSRModulate(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id=f"{PREFIX}MMRealSRModulate",
            display_name="MM-RealSR Modulate",
            category=CATEGORY,
            description="x4 super-resolution whose restoration strength follows two scores, blur and noise: "
            "estimated from the image or set by hand. Sweep one score to compare results side by side.",
            inputs=[
                MMRealSRModel.Input("model", tooltip="An MM-RealSR model from 'Load RealSR Model'."),
                io.Image.Input("image", tooltip="Images to upscale (RGB, RGBA or gray)."),
                *_score_inputs("blur", "blur"),
                *_score_inputs("noise", "noise (and JPEG)"),
                io.Combo.Input("sweep", options=["off", "blur", "noise"], default="off",
                               tooltip="Output a batch of the first image with this score going from 0 to 1 "
                               "(the other score as set above)."),
                io.Int.Input("sweep_steps", default=5, min=2, max=16,
                             tooltip="Number of images in the sweep."),
                *tile_inputs(),
            ],
            outputs=[
                io.Image.Output(display_name="image", tooltip="The upscaled images (or the sweep)."),
                io.Float.Output(display_name="blur", tooltip="The blur score used for the first image."),
                io.Float.Output(display_name="noise", tooltip="The noise score used for the first image."),
            ],
        )

    @classmethod
    def execute(cls, model, image, blur_mode: str, blur: float, noise_mode: str, noise: float, sweep: str,
                sweep_steps: int, tile_size: str, overlap: int) -> io.NodeOutput:
        model = host.require(model, "mmrealsr", "MM-RealSR Modulate")
        scores = {"blur": blur if blur_mode == "manual" else None, "noise": noise if noise_mode == "manual" else None}
        if sweep != "off":
            image = image[:1].expand(sweep_steps, -1, -1, -1)
            scores[sweep] = torch.linspace(0, 1, sweep_steps).tolist()
        out, ctx = host.run_upscale(model, image, tile=tile_size, overlap=overlap, **scores)
        used = ctx[0]["degrees"][0].tolist()
        return io.NodeOutput(out, used[0], used[1])
