"""Load RealSR Model: any checkpoint the core supports, on the output of its family."""

from __future__ import annotations

from comfy_api.latest import io

from . import host
from .types import CATEGORY, LOADER_OUTPUTS, PREFIX


class LoadRealSRModel(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id=f"{PREFIX}LoadModel",
            display_name="Load RealSR Model",
            category=CATEGORY,
            description="Loads a FeMaSR, MM-RealSR, CRL-SR, ESRGAN / Real-ESRGAN (RRDBNet, compact), StableSR "
            "module, CFW VAE or LWay module checkpoint (official file names and containers), or an ncnn model "
            "(x.param with its x.bin beside it: Real-ESRGAN's ncnn files) from models/realsr or "
            "models/upscale_models, or a model shipped with the pack (built-in/...: the CRL-SR x4 upscaler and the "
            "LWay module). Only the output of the file's family carries the model; 'SR model' carries any "
            "feed-forward upscaler for 'RealSR Upscale' and LWay, and UPSCALE_MODEL the ESRGAN / Real-ESRGAN ones "
            "for ComfyUI's 'Upscale Image (using Model)'.",
            inputs=[
                io.Combo.Input("model_name", options=host.model_files(),
                               tooltip="built-in/crlsr_x4.safetensors or built-in/lway_rec.safetensors (shipped, no "
                               "download) or a checkpoint in "
                               "models/realsr (or models/upscale_models), e.g. FeMaSR_SRX4_model_g.pth, "
                               "MMRealSRGAN.pth, stablesr_000117.ckpt, vqgan_cfw_00011.ckpt, RealESRGAN_x4plus.pth "
                               "or realesrgan-x4plus-anime.param (ncnn: its .bin must sit beside it)."),
            ],
            outputs=[t.Output(display_name=label, tooltip=tooltip) for _, t, label, tooltip in LOADER_OUTPUTS],
        )

    @classmethod
    def validate_inputs(cls, model_name: str) -> bool | str:
        """Replaces ComfyUI's "Value not in list" for a file that is not there: the folder it belongs in and its link."""
        if model_name in host.model_files():
            return True
        return host.missing_model_message(model_name)

    @classmethod
    def execute(cls, model_name: str) -> io.NodeOutput:
        model, upscale_model = host.load(model_name)
        return io.NodeOutput(*[
            upscale_model if t is io.UpscaleModel
            else model if model.arch in (arch if isinstance(arch, tuple) else (arch,))
            else host.NotThisModel(label, model.desc.name, model_name)
            for arch, t, label, _ in LOADER_OUTPUTS
        ])
