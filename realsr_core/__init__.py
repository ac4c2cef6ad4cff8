"""realsr_core: host-agnostic real-world super-resolution (pure PyTorch, never imports ComfyUI).

Public API::

    from realsr_core import load_model, upscale
    desc = load_model("FeMaSR_SRX4_model_g.pth")          # detects the method, infers its config
    out = upscale(desc, image, tile="auto").image           # image: (B, C, H, W) in [0, 1]
"""

from .checkpoint import Checkpoint, load_checkpoint, read_file
from .colorfix import color_fix
from .descriptor import Architecture, ModelDescriptor
from .errors import Cancelled, CheckpointError, InvalidInputError, RealSRError, UnsupportedModelError
from .inference import UpscaleResult, upscale
from .registry import architectures, detect, load_model

__all__ = [
    "Architecture", "Cancelled", "Checkpoint", "CheckpointError", "InvalidInputError", "ModelDescriptor",
    "RealSRError", "UnsupportedModelError", "UpscaleResult", "architectures", "color_fix", "detect",
    "load_checkpoint", "load_model", "read_file", "upscale",
]
__version__ = "0.1.0"
