"""FeMaSR (ACM MM 2022): x2/x4 real-world SR by matching features to a VQGAN codebook, and its HRP autoencoder."""

from .arch import ARCHITECTURE, FeMaSRDescriptor, detect, infer_config, load, pad_size, symmetric_pad
from .network import FeMaSRConfig, FeMaSRNet, NearestUpConv, SwinConfig, SwinLayers, nearest_up_conv_weight

__all__ = [
    "ARCHITECTURE",
    "FeMaSRConfig",
    "FeMaSRDescriptor",
    "FeMaSRNet",
    "NearestUpConv",
    "SwinConfig",
    "SwinLayers",
    "detect",
    "infer_config",
    "load",
    "nearest_up_conv_weight",
    "pad_size",
    "symmetric_pad",
]
