"""CRL-SR (Zhang et al., 2021): blind SR via contrastive representation learning -- network, losses, loader."""

from .arch import ARCHITECTURE, DETECT_KEYS, detect, has_training_parts, infer_config, load
from .losses import (
    bidirectional_contrastive_loss,
    conditional_contrastive_loss,
    contrastive_loss,
    gather_positions,
    reconstruction_loss,
    sample_positions,
    srnce_penalty,
)
from .network import (
    CRLSR,
    INFERENCE_PREFIXES,
    TRAINING_PREFIXES,
    CRLSRConfig,
    CRLSRLossConfig,
    ProjectionHead,
    ReconstructionDecoder,
    RefinementDecoder,
    UnshuffleEncoder,
    bicubic_upsample,
)

__all__ = [
    "ARCHITECTURE",
    "CRLSR",
    "DETECT_KEYS",
    "INFERENCE_PREFIXES",
    "TRAINING_PREFIXES",
    "CRLSRConfig",
    "CRLSRLossConfig",
    "ProjectionHead",
    "ReconstructionDecoder",
    "RefinementDecoder",
    "UnshuffleEncoder",
    "bicubic_upsample",
    "bidirectional_contrastive_loss",
    "conditional_contrastive_loss",
    "contrastive_loss",
    "detect",
    "gather_positions",
    "has_training_parts",
    "infer_config",
    "load",
    "reconstruction_loss",
    "sample_positions",
    "srnce_penalty",
]
