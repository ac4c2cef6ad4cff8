"""StableSR (IJCV 2024): diffusion-prior SR with a time-aware encoder and SFT-modulated SD2.1 UNet.

This package holds the SR module (``encoder``, ``sft``, ``arch``); the UNet, the CFW VAE and the
sampler live beside it and import from here.
"""

from .arch import (
    ARCHITECTURE,
    DETECT_KEYS,
    StableSRDescriptor,
    StableSRModule,
    detect,
    infer_config,
    load,
    split_state_dict,
)
from .encoder import (
    EncoderConfig,
    GroupNorm32,
    LegacyAttentionBlock,
    TimeAwareEncoder,
    TimestepResBlock,
    cond_by_shape,
    infer_encoder_config,
    select_cond,
    timestep_embedding,
)
from .sft import (
    SFTLayer,
    SFTLayers,
    attach_sft,
    bind_sft_forward,
    infer_sft_spec,
    resblock_channels,
    resblock_forward_with_sft,
)

__all__ = [
    "ARCHITECTURE",
    "DETECT_KEYS",
    "EncoderConfig",
    "GroupNorm32",
    "LegacyAttentionBlock",
    "SFTLayer",
    "SFTLayers",
    "StableSRDescriptor",
    "StableSRModule",
    "TimeAwareEncoder",
    "TimestepResBlock",
    "attach_sft",
    "bind_sft_forward",
    "cond_by_shape",
    "detect",
    "infer_config",
    "infer_encoder_config",
    "infer_sft_spec",
    "load",
    "resblock_channels",
    "resblock_forward_with_sft",
    "select_cond",
    "split_state_dict",
    "timestep_embedding",
]
