"""ESRGAN / Real-ESRGAN generators (RRDBNet, SRVGGNetCompact): the GAN-trained upscalers users already have, read
from their released ``.pth`` / ``.safetensors`` files or from ncnn files (:mod:`realsr_core.ncnn`)."""

from .arch import COMPACT, ESRGAN, OUTPUT_SCALE_KEY, OutputResize
from .network import RRDBNet, SRVGGNetCompact

__all__ = ["COMPACT", "ESRGAN", "OUTPUT_SCALE_KEY", "OutputResize", "RRDBNet", "SRVGGNetCompact"]
