"""StableSR SR module (time-aware encoder + SFT layers): key detection, configuration inference, loading.

Two released containers hold the module:

* the extracted module of the webui / ComfyUI ports (``webui_768v_139.ckpt``,
  ``stablesr_webui_sd-v2-1-512-ema-000117.ckpt``): a flat dict of ``structcond_stage_model.*`` and
  ``model.diffusion_model.<block>.spade.*`` keys only;
* the full Lightning checkpoints (``stablesr_000117.ckpt``, ``stablesr_768v_000139.ckpt``,
  ``stablesr_turbo.ckpt``): ``state_dict`` with the same keys plus the whole SD2.1 UNet, the VAE
  (``first_stage_model.*``), OpenCLIP (``cond_stage_model.*``) and the schedule buffers.  Only the
  module is taken; every other key is reported in ``ignored_keys`` (names only).

The module is not an image-to-image model: the StableSR sampler runs the encoder on the LR latent at
every step and installs the SFT layers into the diffusion UNet's residual blocks.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from ...descriptor import Architecture, ModelDescriptor, StateDict, check_weights, has_all, shape_of
from ...errors import InvalidInputError, UnsupportedModelError
from .encoder import DEFAULT_NUM_HEADS, EncoderConfig, TimeAwareEncoder, infer_encoder_config
from .sft import SFTLayers, infer_sft_spec

__all__ = [
    "ARCHITECTURE",
    "DETECT_KEYS",
    "StableSRDescriptor",
    "StableSRModule",
    "detect",
    "infer_config",
    "load",
    "split_state_dict",
]

ENCODER_PREFIX = "structcond_stage_model."
UNET_PREFIX = "model.diffusion_model."
_SPADE = ".spade."
DETECT_KEYS: tuple[str, ...] = (
    ENCODER_PREFIX + "time_embed.0.weight",
    ENCODER_PREFIX + "input_blocks.0.0.weight",
    ENCODER_PREFIX + "fea_tran.0.in_layers.2.weight",
    UNET_PREFIX + "input_blocks.1.0.spade.param_free_norm.weight",
    UNET_PREFIX + "input_blocks.1.0.spade.mlp_shared.0.weight",
)
# ComfyUI's SD2 v-prediction heuristic (frozen UNet, so it holds for the StableSR checkpoints too).
_VPRED_KEY = UNET_PREFIX + "output_blocks.11.1.transformer_blocks.0.norm1.bias"


def detect(state_dict: StateDict) -> bool:
    """True for a StableSR SR module, extracted or inside a full checkpoint (not the CFW VAE)."""
    return has_all(state_dict, *DETECT_KEYS)


class StableSRModule(nn.Module):
    """The trainable part of StableSR: the time-aware encoder and the UNet's SFT layers.

    Args:
        encoder_config: the encoder architecture.
        sft_channels: ``{ResBlock path: channels}`` of the modulated UNet blocks.
        sft_hidden_channels: width of each SFT layer's shared conv.

    Attributes:
        encoder: :class:`TimeAwareEncoder` (``structcond_stage_model``).
        sft_layers: :class:`SFTLayers`, keyed by ResBlock path.
    """

    def __init__(
        self, encoder_config: EncoderConfig, sft_channels: Mapping[str, int], sft_hidden_channels: int = 128
    ) -> None:
        super().__init__()
        self.encoder = TimeAwareEncoder(encoder_config)
        self.sft_layers = SFTLayers(sft_channels, encoder_config.out_channels, sft_hidden_channels)

    def forward(self, lr_latent: Tensor, timesteps: Tensor | float | int) -> dict[str, Tensor]:
        """The condition dict for one UNet call (see :meth:`TimeAwareEncoder.forward`).

        Args:
            lr_latent: (B, 4, h, w) scaled LR latent, cropped like the UNet input.
            timesteps: (B,) original timesteps 0..999 given to the UNet.

        Returns:
            ``{str(w_i): (B, C_cond, h_i, w_i)}``.
        """
        return self.encoder(lr_latent, timesteps)

    encode = forward

    def official_state_dict(self) -> dict[str, Tensor]:
        """The weights under the released key names (the extracted-module layout)."""
        out = {ENCODER_PREFIX + k: v for k, v in self.encoder.state_dict().items()}
        for path, layer in self.sft_layers:
            out.update({f"{UNET_PREFIX}{path}.spade.{k}": v for k, v in layer.state_dict().items()})
        return out


def split_state_dict(state_dict: StateDict) -> tuple[dict[str, Tensor], dict[str, Tensor], list[str]]:
    """Separate the module from the rest of a checkpoint.

    Returns:
        ``(encoder, sft, ignored)``: encoder keys without ``structcond_stage_model.``; SFT keys as
        ``<path>.<param>`` (``model.diffusion_model.`` and ``.spade`` removed); the names of all other
        keys (UNet, VAE, CLIP, schedule buffers).
    """
    encoder: dict[str, Tensor] = {}
    sft: dict[str, Tensor] = {}
    ignored: list[str] = []
    for key, t in state_dict.items():
        if key.startswith(ENCODER_PREFIX):
            encoder[key[len(ENCODER_PREFIX) :]] = t
        elif key.startswith(UNET_PREFIX) and _SPADE in key:
            path, param = key[len(UNET_PREFIX) :].split(_SPADE, 1)
            sft[f"{path}.{param}"] = t
        else:
            ignored.append(key)
    return encoder, sft, ignored


def _file_key(key: str) -> str:
    """The released name of a :class:`StableSRModule` key, for messages: ``encoder.<k>`` is
    ``structcond_stage_model.<k>``, ``sft_layers.<path>.<param>`` is ``model.diffusion_model.<path>.spade.<param>``
    (``<path>`` is the block name and its numeric indices, e.g. ``input_blocks.1.0``)."""
    if key.startswith("encoder."):
        return ENCODER_PREFIX + key[len("encoder.") :]
    parts = key[len("sft_layers.") :].split(".")
    n = 1
    while n < len(parts) and parts[n].isdigit():
        n += 1
    return f"{UNET_PREFIX}{'.'.join(parts[:n])}{_SPADE}{'.'.join(parts[n:])}"


def _unet_layout(channels: Mapping[str, int]) -> dict[str, Any]:
    """UNet channel layout implied by the SFT layers (input-block runs between downsamples = levels)."""
    inputs = sorted((int(p.split(".")[1]), c) for p, c in channels.items() if p.startswith("input_blocks."))
    levels: list[list[int]] = []
    prev = -2
    for idx, c in inputs:
        if idx != prev + 1:
            levels.append([])
        levels[-1].append(c)
        prev = idx
    layout: dict[str, Any] = {
        "resblock_channels": dict(channels),
        "num_sft_layers": len(channels),
        "input_blocks": [p for p in channels if p.startswith("input_blocks.")],
        "middle_block": [p for p in channels if p.startswith("middle_block.")],
        "output_blocks": [p for p in channels if p.startswith("output_blocks.")],
    }
    if levels:
        mc = levels[0][0]  # SD UNets have channel_mult[0] == 1
        layout["model_channels"] = mc
        layout["channel_mult"] = [lv[0] // mc for lv in levels]
        sizes = {len(lv) for lv in levels}
        layout["num_res_blocks"] = sizes.pop() if len(sizes) == 1 else [len(lv) for lv in levels]
    return layout


def _infer(
    state_dict: StateDict, num_heads: int, num_head_channels: int
) -> tuple[dict[str, Any], EncoderConfig, dict[str, int]]:
    if not detect(state_dict):
        missing = [k for k in DETECT_KEYS if k not in state_dict]
        raise UnsupportedModelError(f"not a StableSR SR module: missing {missing}")
    enc_sd, _, _ = split_state_dict(state_dict)
    enc = infer_encoder_config(enc_sd, num_heads, num_head_channels, file_prefix=ENCODER_PREFIX)
    sft_channels, cond_ch, hidden = infer_sft_spec(state_dict, UNET_PREFIX)
    if cond_ch != enc.out_channels:
        raise UnsupportedModelError(
            f"StableSR SFT layers take {cond_ch}-channel condition maps but the encoder makes {enc.out_channels}"
        )
    unet = _unet_layout(sft_channels)
    conv_in = UNET_PREFIX + "input_blocks.0.0.weight"
    if conv_in in state_dict:
        unet["model_channels"], unet["in_channels"] = shape_of(state_dict, conv_in, "StableSR UNet", ndim=4)[:2]
    vbias = state_dict.get(_VPRED_KEY)
    if vbias is not None and vbias.device.type != "meta":
        unet["prediction_guess"] = "v" if float(vbias.float().std()) > 0.09 else "eps"
    config = {
        "full_checkpoint": conv_in in state_dict,
        "encoder": enc.as_dict(),
        "sft": {"cond_channels": cond_ch, "hidden_channels": hidden, "num_layers": len(sft_channels)},
        "unet": unet,
    }
    return config, enc, sft_channels


def infer_config(
    state_dict: StateDict, num_heads: int = DEFAULT_NUM_HEADS, num_head_channels: int = -1
) -> dict[str, Any]:
    """Everything about the module that the tensor shapes say (plus the given attention split).

    Args:
        state_dict: an extracted module or a full checkpoint's state dict (released key names).
        num_heads, num_head_channels: the encoder's attention split (not in the weights).

    Returns:
        ``{"full_checkpoint": bool, "encoder": EncoderConfig as a dict, "sft": {cond_channels,
        hidden_channels, num_layers}, "unet": {resblock_channels {path: C}, model_channels,
        channel_mult, num_res_blocks, ...}}``; ``unet`` also has ``in_channels`` and
        ``prediction_guess`` (ComfyUI's SD2 v-prediction heuristic) when the UNet weights are in the file.

    Raises:
        UnsupportedModelError: not a StableSR module, or inconsistent widths.
    """
    return _infer(state_dict, num_heads, num_head_channels)[0]


class StableSRDescriptor(ModelDescriptor):
    """A loaded StableSR SR module.  It runs inside the StableSR sampler, not as an upscaler."""

    model: StableSRModule

    @property
    def encoder(self) -> TimeAwareEncoder:
        return self.model.encoder

    @property
    def sft_layers(self) -> SFTLayers:
        return self.model.sft_layers

    def forward(self, x: Tensor, **context: Any) -> Tensor:
        """Refused: the module is not an image-to-image model."""
        raise InvalidInputError(
            f"{self.name} is not an image-to-image model: its time-aware encoder and SFT layers run inside the "
            "StableSR sampler together with a Stable Diffusion 2.1 UNet (use the StableSR upscale pipeline, "
            "which takes this module, the UNet and the VAE)"
        )

    __call__ = forward


def load(
    state_dict: StateDict, *, num_heads: int = DEFAULT_NUM_HEADS, num_head_channels: int = -1
) -> StableSRDescriptor:
    """Build the SR module from an extracted module or a full StableSR checkpoint's state dict.

    Args:
        state_dict: canonical state dict (wrapper removed).
        num_heads, num_head_channels: the encoder's attention split, not stored in the weights
            (default: the released 4 heads).

    Raises:
        UnsupportedModelError: not a StableSR module, or tensors that do not fit the inferred layout.
        CheckpointError: weights that are NaN/inf or not floating point (:func:`check_weights`).
    """
    config, enc_cfg, sft_channels = _infer(state_dict, num_heads, num_head_channels)
    enc_sd, sft_sd, ignored = split_state_dict(state_dict)
    # Built on the meta device and filled by assignment: no random init, no second copy of 105 M weights.
    with torch.device("meta"):
        module = StableSRModule(enc_cfg, sft_channels, config["sft"]["hidden_channels"])
    given = {"encoder." + k: v for k, v in enc_sd.items()}
    given.update({"sft_layers." + k: v for k, v in sft_sd.items()})
    expected = module.state_dict()
    missing = [k for k in expected if k not in given]
    unexpected = [k for k in given if k not in expected]
    if missing or unexpected:
        raise UnsupportedModelError(
            "StableSR module does not match the inferred layout "
            f"(encoder channel_mult {list(enc_cfg.channel_mult)}, {len(sft_channels)} SFT layers): "
            f"missing {missing[:5]}{'...' if len(missing) > 5 else ''}, "
            f"unexpected {unexpected[:5]}{'...' if len(unexpected) > 5 else ''}"
        )
    bad = [k for k, v in given.items() if tuple(v.shape) != tuple(expected[k].shape)]
    if bad:
        k = bad[0]
        raise UnsupportedModelError(
            f"StableSR tensor {k} has shape {tuple(given[k].shape)}, expected {tuple(expected[k].shape)} "
            f"for the inferred layout ({len(bad)} mismatching tensors)"
        )
    check_weights("StableSR", expected, given, file_key=_file_key)
    module.load_state_dict({k: v.to(torch.float32) for k, v in given.items()}, strict=True, assign=True)
    module.requires_grad_(False)
    full = bool(config["full_checkpoint"])
    return StableSRDescriptor(
        module,
        arch="stablesr",
        name="StableSR SR module" + (" (from a full checkpoint)" if full else ""),
        purpose="Module",
        scale=1,
        in_channels=enc_cfg.in_channels,
        out_channels=enc_cfg.in_channels,
        size_multiple=1,
        min_size=1,
        supports_half=True,
        supports_bf16=True,
        config=config,
        ignored_keys=ignored,
    )


ARCHITECTURE = Architecture(
    id="stablesr",
    name="StableSR",
    detect=detect,
    load=load,
    wrapper_preference="state_dict",
    key_hints=DETECT_KEYS,
)
