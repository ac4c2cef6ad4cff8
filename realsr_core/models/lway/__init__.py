"""LWay (Chen et al., CVPR 2024): the LR-reconstruction branch (degradation encoder E, reconstructor R).

The test-time fine-tuning that uses it lives in :mod:`realsr_core.adapt.lway`.
"""

from .arch import ARCHITECTURE, DETECT_KEYS, LWayDescriptor, detect, infer_config, load
from .network import (
    DegradationEncoder,
    LWayConfig,
    LWayReconstruction,
    ModulatedConv2d,
    ModulatedResBlock,
    Reconstructor,
    bicubic_resize,
)

__all__ = [
    "ARCHITECTURE",
    "DETECT_KEYS",
    "DegradationEncoder",
    "LWayConfig",
    "LWayDescriptor",
    "LWayReconstruction",
    "ModulatedConv2d",
    "ModulatedResBlock",
    "Reconstructor",
    "bicubic_resize",
    "detect",
    "infer_config",
    "load",
]
