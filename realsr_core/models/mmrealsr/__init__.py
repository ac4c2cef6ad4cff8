"""MM-RealSR (ECCV 2022): x4 RRDB super-resolution modulated by (blur, noise) degradation scores."""

from .arch import ARCHITECTURE, MMRealSRDescriptor, detect, infer_config, load
from .network import AffineModulation, DegradationEstimator, MMRealSRNet

__all__ = [
    "ARCHITECTURE",
    "AffineModulation",
    "DegradationEstimator",
    "MMRealSRDescriptor",
    "MMRealSRNet",
    "detect",
    "infer_config",
    "load",
]
