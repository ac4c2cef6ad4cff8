"""LWay fine-tuning: adapt an SR model to the images in front of it (no ground truth), for our models and
ComfyUI's UPSCALE_MODEL (spandrel) alike; each node returns the adapted model on the socket type it took."""

from __future__ import annotations

from comfy_api.latest import io

from ..realsr_core.adapt.plot import loss_curve_image
from . import host
from .types import CATEGORY, FEED_FORWARD, PREFIX, LWayModule, SRModel

_DESCRIPTION = (
    "LWay (Low-Res Leads the Way, CVPR 2024): fine-tunes a copy of the SR model on the LR image(s) themselves: "
    "super-resolve random patches, degrade the result again with the frozen LWay module conditioned on the "
    "image's own degradation, and match the input, weighted toward its edges. The input model is left as it was. "
    "Compare the result with the unadapted model's: on heavily compressed or noisy inputs it can get worse. "
)


def _inputs() -> list[io.Input]:
    return [
        io.Image.Input("images", tooltip="The LR image(s) to adapt to: the same images you will upscale "
                       "(several images of one source adapt to their shared degradation)."),
        LWayModule.Input("lway", tooltip="The 'LWay module' output of 'Load RealSR Model' "
                         "(built-in/lway_rec.safetensors ships with the pack)."),
        io.Int.Input("iterations", default=100, min=1, max=5000,
                     tooltip="Optimiser steps (the paper: 100-700). Each step super-resolves batch_size patches."),
        io.Float.Input("learning_rate", default=1e-5, min=1e-7, max=1e-3, step=1e-6,
                       tooltip="Adam learning rate (the paper: 2e-6 to 5e-5). Keep it small: on noisy or JPEG-compressed "
                       "images LWay can pull the result toward the input's artifacts (see BENCHMARKS.md, LWay)."),
        io.Int.Input("patch_size", default=64, min=16, max=256, step=8,
                     tooltip="Side of the random LR patches (capped by the smallest image side)."),
        io.Int.Input("batch_size", default=4, min=1, max=32, tooltip="Patches per step."),
        io.String.Input("params", default="all",
                        tooltip="Which weights to train: 'all', 'last:0.3' (the last 30% of the weights in "
                        "network order) or a regular expression on parameter names (e.g. 'conv_last|conv_hr')."),
        io.Int.Input("seed", default=0, min=0, max=2**31 - 1, tooltip="Seeds the patch positions."),
    ]


def _loss_plot(losses: list[float]):
    return loss_curve_image(losses, title="LWay self-supervised loss")[None]


def _options(iterations: int, learning_rate: float, patch_size: int, batch_size: int, params: str,
             seed: int) -> dict:
    return {"iterations": iterations, "lr": learning_rate, "patch_size": patch_size, "batch_size": batch_size,
            "params": params.strip() or "all", "seed": seed}


class LWayFinetune(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id=f"{PREFIX}LWayFinetune",
            display_name="LWay Fine-tune (RealSR model)",
            category=CATEGORY,
            description=_DESCRIPTION + "Connect the result to 'RealSR Upscale'.",
            inputs=[SRModel.Input("model", tooltip="The 'SR model' output of 'Load RealSR Model' (CRL-SR, FeMaSR, "
                                  "MM-RealSR, ESRGAN / Real-ESRGAN)."), *_inputs()],
            outputs=[SRModel.Output(display_name="model", tooltip="The adapted copy."),
                     io.Image.Output(display_name="loss", tooltip="The loss curve (light: every step, dark: mean).")],
        )

    @classmethod
    def execute(cls, model, images, lway, **options) -> io.NodeOutput:
        model = host.require(model, FEED_FORWARD, "LWay Fine-tune")
        lway = host.require(lway, "lway", "LWay Fine-tune")
        res = host.run_finetune(model.desc, images, lway, **_options(**options))
        return io.NodeOutput(host.wrap(res.model, f"{model.file} + LWay"), _loss_plot(res.losses))


class LWayFinetuneUpscaleModel(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id=f"{PREFIX}LWayFinetuneUpscaleModel",
            display_name="LWay Fine-tune (upscale model)",
            category=CATEGORY,
            description=_DESCRIPTION + "Works on any model from 'Load Upscale Model' (ESRGAN, SwinIR, ...); connect "
            "the result to 'Upscale Image (using Model)'.",
            inputs=[io.UpscaleModel.Input("upscale_model", tooltip="A model from ComfyUI's 'Load Upscale Model'."),
                    *_inputs()],
            outputs=[io.UpscaleModel.Output(display_name="upscale_model", tooltip="The adapted copy."),
                     io.Image.Output(display_name="loss", tooltip="The loss curve (light: every step, dark: mean).")],
        )

    @classmethod
    def execute(cls, upscale_model, images, lway, **options) -> io.NodeOutput:
        lway = host.require(lway, "lway", "LWay Fine-tune")
        res = host.run_finetune(upscale_model, images, lway, **_options(**options))
        return io.NodeOutput(res.model, _loss_plot(res.losses))
