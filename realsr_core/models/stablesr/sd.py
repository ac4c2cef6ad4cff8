"""The Stable Diffusion 2.x model StableSR runs on, read from the released checkpoint without a host.

An SD 2.1 file (``v2-1_512-ema-pruned`` or ``v2-1_768-ema-pruned``, ``.safetensors`` or ``.ckpt``, or a whole
StableSR Lightning checkpoint) holds the UNet (``model.diffusion_model.*``), the VAE (``first_stage_model.*``)
and the OpenCLIP text tower (``cond_stage_model.model.*``).  The 512 and 768-v files have the same layout;
which one predicts v is read from the weights (see :func:`is_v_prediction`), never from the file name.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor

from ...checkpoint import Checkpoint, load_checkpoint, read_tensors
from ...descriptor import StateDict
from ...errors import InvalidInputError, UnsupportedModelError
from .cfw import VAEDescriptor, load_vae
from .text import TEXT_PREFIX, OpenCLIPTextTower, empty_prompt_tokens, is_text_state_dict, tokenize
from .unet import UNET_PREFIX, StableSRUNet, load_unet

__all__ = ["SD_FILE_PREFIXES", "SDModel", "check_module_fits", "is_v_prediction", "load_sd", "sd_kind"]

# The 768-v model's weights differ from the 512 (eps) model's in the spread of this LayerNorm bias (a fact
# ComfyUI's SD 2.x detection relies on; both have exactly the same layout).
_VPRED_KEY = "output_blocks.11.1.transformer_blocks.0.norm1.bias"
_VPRED_STD = 0.09
# What ``load_sd(..., unet=False)`` reads from a file (``checkpoint.read_tensors``): the VAE, the text tower and
# the few UNet tensors that tell SD 2.x from SD 1.x / SDXL and eps from v-prediction.
SD_FILE_PREFIXES = (
    "first_stage_model.", TEXT_PREFIX, UNET_PREFIX + "input_blocks.0.0.", UNET_PREFIX + "label_emb.",
    UNET_PREFIX + "middle_block.1.transformer_blocks.0.attn2.to_k.", UNET_PREFIX + _VPRED_KEY,
)


def sd_kind(state_dict: StateDict) -> str:
    """What a checkpoint is, for messages: "SD 2.x", "SD 1.x", "SDXL", or a description of what it is not."""
    unet = UNET_PREFIX + "input_blocks.0.0.weight"
    if unet not in state_dict:
        return "not a Stable Diffusion checkpoint (it has no model.diffusion_model.* UNet)"
    if any(k.startswith("conditioner.embedders.") for k in state_dict) or UNET_PREFIX + "label_emb.0.0.weight" in state_dict:
        return "SDXL"
    ctx = state_dict.get(UNET_PREFIX + "middle_block.1.transformer_blocks.0.attn2.to_k.weight")
    if ctx is not None and int(ctx.shape[-1]) == 768:
        return "SD 1.x"
    return "SD 2.x"


def is_v_prediction(state_dict: StateDict, prefix: str = "") -> bool:
    """True for a v-prediction SD 2.x UNet (the 768-v model), read from its weights.

    Args:
        state_dict: the UNet's keys, under ``prefix`` (``model.diffusion_model.`` in a checkpoint).
    """
    bias = state_dict.get(prefix + _VPRED_KEY)
    return bias is not None and float(bias.float().std(unbiased=False)) > _VPRED_STD


def check_module_fits(module: Any, channels_of: Callable[[str], int | None]) -> None:
    """Refuse a StableSR module whose SFT layers do not match the UNet's ResBlocks.

    Args:
        module: a :class:`~realsr_core.models.stablesr.StableSRModule`.
        channels_of: the output channels of the UNet's ResBlock at a path (``input_blocks.1.0``), or None
            when there is no ResBlock there; front-ends answer it for their own UNet.

    Raises:
        InvalidInputError: naming up to 4 mismatching blocks.
    """
    bad: list[str] = []
    for path, layer in module.sft_layers:
        channels = channels_of(path)
        if channels is None:
            bad.append(f"{path} (missing)")
        elif channels != layer.channels:
            bad.append(f"{path} ({channels} channels, module {layer.channels})")
    if bad:
        raise InvalidInputError(
            "the StableSR module does not fit this UNet (it needs a Stable Diffusion 2.x UNet: SD 2.1 512 for the "
            f"512 module, 768-v for the 768 module); mismatching blocks: {bad[:4]}"
        )


def unet_channels(unet: StableSRUNet) -> Callable[[str], int | None]:
    """``channels_of`` for the core UNet (see :func:`check_module_fits`)."""
    blocks = {p: unet.get_submodule(p) for p in unet.resblock_paths()}
    return lambda path: getattr(blocks.get(path), "out_channels", None)


@dataclass
class SDModel:
    """The parts of an SD 2.x checkpoint StableSR uses, on one device."""

    unet: StableSRUNet | None  # None when loaded without it (``load_sd(..., unet=False)``)
    vae: VAEDescriptor
    text: OpenCLIPTextTower | None
    prediction: Literal["eps", "v"]
    source: str

    def context(self, prompt: str = "", device: torch.device | str | None = None) -> Tensor:
        """(1, 77, D) text context: the official empty prompt by default (tokens fixed, no tokenizer needed)."""
        if self.text is None:
            raise InvalidInputError(f"{self.source} has no text encoder (cond_stage_model.model.*)")
        tokens = empty_prompt_tokens(1) if not prompt.strip() else tokenize(prompt)
        with torch.no_grad():
            ctx = self.text(tokens.to(self.text.positional_embedding.device))
        return ctx.to(device) if device is not None else ctx

    def describe(self) -> dict[str, Any]:
        cfg = self.unet.config
        return {
            "arch": "sd2", "name": f"Stable Diffusion 2.x ({'768-v, v-prediction' if self.prediction == 'v' else '512, eps'})",
            "prediction": self.prediction, "unet": cfg.as_dict(),
            "unet_params": sum(p.numel() for p in self.unet.parameters()),
            "vae": self.vae.describe(), "text_encoder": None if self.text is None else vars(self.text.config),
        }


def load_sd(
    source: str | os.PathLike[str] | Mapping[str, Any],
    *,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    text: bool = True,
    unet: bool = True,
) -> SDModel:
    """Read an SD 2.x checkpoint (file or state dict) into the core UNet, VAE and text tower.

    ``unet=False`` leaves the UNet out (a host that has it loaded already): from a file, only the VAE, the text
    tower and the few UNet tensors of :data:`SD_FILE_PREFIXES` are read; the prediction type is still read.

    Raises:
        UnsupportedModelError: not a Stable Diffusion checkpoint, or SD 1.x / SDXL (StableSR needs SD 2.x), or
            tensors that do not form the models (the loaders name the tensor).
        CheckpointError: unreadable file, code in a pickle, NaN / non-float weights.
    """
    if unet or isinstance(source, Mapping):
        ckpt = load_checkpoint(source, prefer="state_dict")
    else:
        prefixes = SD_FILE_PREFIXES if text else tuple(p for p in SD_FILE_PREFIXES if p != TEXT_PREFIX)
        ckpt = Checkpoint(read_tensors(source, prefixes), source=Path(source).name)
    sd = ckpt.state_dict
    kind = sd_kind(sd)
    if kind != "SD 2.x":
        raise UnsupportedModelError(
            f"{ckpt.source}: {kind}; StableSR runs on Stable Diffusion 2.1 (v2-1_512-ema-pruned or "
            "v2-1_768-ema-pruned)"
        )
    model_channels = int(sd[UNET_PREFIX + "input_blocks.0.0.weight"].shape[0])
    # SD 2.x splits attention into 64-channel heads (320 / 640 / 1280 wide levels); a narrower test UNet
    # gets one head per level instead.
    net = load_unet(sd, num_head_channels=64 if model_channels % 64 == 0 else model_channels) if unet else None
    prediction: Literal["eps", "v"] = "v" if is_v_prediction(sd, UNET_PREFIX) else "eps"
    vae = load_vae({k: v for k, v in sd.items() if k.startswith("first_stage_model.")})
    tower = None
    if text and is_text_state_dict(sd):
        width = int(sd[TEXT_PREFIX + "token_embedding.weight"].shape[-1])
        # OpenCLIP's 64 channels a head; a tower narrower than one head (test models) gets one head.
        tower = OpenCLIPTextTower.from_state_dict(sd, heads=None if width % 64 == 0 else 1)
    elif text:
        raise UnsupportedModelError(f"{ckpt.source}: no OpenCLIP text encoder (cond_stage_model.model.*) in this "
                                    "SD 2.x checkpoint; StableSR's empty-prompt context needs it")
    for m in (net, tower):
        if m is not None:
            m.to(device=device, dtype=dtype).eval()
    vae.to(device, dtype)
    return SDModel(net, vae, tower, prediction, ckpt.source)
