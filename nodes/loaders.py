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
            description="Loads a FeMaSR, MM-RealSR, CRL-SR, StableSR module, CFW VAE or LWay module checkpoint "
            "(official file names and containers) from models/realsr or models/upscale_models, or a model shipped "
            "with the pack (built-in/...: the CRL-SR x4 upscaler and the LWay module). Only the output of the file's "
            "family carries the model; 'SR model' carries any feed-forward upscaler (FeMaSR, MM-RealSR, CRL-SR) for "
            "'RealSR Upscale' and LWay.",
            inputs=[
                io.Combo.Input("model_name", options=host.model_files(),
                               tooltip="built-in/crlsr_x4.safetensors or built-in/lway_rec.safetensors (shipped, no "
                               "download) or a checkpoint in "
                               "models/realsr (or models/upscale_models), e.g. FeMaSR_SRX4_model_g.pth, "
                               "MMRealSRGAN.pth, stablesr_000117.ckpt or vqgan_cfw_00011.ckpt."),
            ],
            outputs=[t.Output(display_name=label, tooltip=f"The model when the file is {label}.")
                     for _, t, label in LOADER_OUTPUTS],
        )

    @classmethod
    def validate_inputs(cls, model_name: str) -> bool | str:
        """Replaces ComfyUI's "Value not in list" for a file that is not there: the folder it belongs in and its link."""
        if model_name in host.model_files():
            return True
        return host.missing_model_message(model_name)

    @classmethod
    def execute(cls, model_name: str) -> io.NodeOutput:
        model = host.load(model_name)
        return io.NodeOutput(*[
            model if model.arch in (arch if isinstance(arch, tuple) else (arch,))
            else host.NotThisModel(label, model.desc.name, model_name)
            for arch, _, label in LOADER_OUTPUTS
        ])
