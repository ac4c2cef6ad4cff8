"""RRDBNet and SRVGGNetCompact: key detection, configuration from tensor shapes, descriptors.

Both read the released layouts (Real-ESRGAN's ``.pth`` files, BasicSR keys; spandrel reads the same keys), and the
state dicts :mod:`realsr_core.ncnn` builds from ncnn files.  An ncnn file may end its graph with a resize of the
network's output (Real-ESRGAN's realesr-animevideov3-x2/x3 are the x4 network followed by a bicubic downscale);
the reader passes that as the tensor ``ncnn.output_scale`` and the descriptor applies it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ...descriptor import (
    Architecture,
    ModelDescriptor,
    StateDict,
    check_layout,
    check_weights,
    has_all,
    own_weight,
    shape_of,
)
from ...descriptor import count_indexed as _count
from ...errors import UnsupportedModelError
from .network import RRDBNet, SRVGGNetCompact

__all__ = ["COMPACT", "ESRGAN", "OUTPUT_SCALE_KEY", "OutputResize"]

OUTPUT_SCALE_KEY = "ncnn.output_scale"  # 0-d tensor: resize factor after the network (bicubic), when not 1
_RRDB_KEYS = ("conv_first.weight", "body.0.rdb1.conv1.weight", "conv_body.weight", "conv_hr.weight", "conv_last.weight")


class OutputResize(nn.Module):
    """A network followed by a bicubic resize of its output by ``factor`` (no antialiasing, as ncnn's Interp)."""

    def __init__(self, net: nn.Module, factor: float) -> None:
        super().__init__()
        self.net, self.factor = net, factor

    def forward(self, x: Tensor) -> Tensor:
        y = self.net(x)
        size = (round(x.shape[-2] * self.net.scale * self.factor), round(x.shape[-1] * self.net.scale * self.factor))
        return F.interpolate(y, size=size, mode="bicubic", align_corners=False)


def _descriptor(model: nn.Module, state_dict: StateDict, arch: str, name: str, config: dict,
                bytes_per_px: float, size_multiple: int = 1) -> ModelDescriptor:
    expected = model.state_dict()
    extra = [k for k in state_dict if k not in expected and k != OUTPUT_SCALE_KEY]
    check_layout(name, str(config), expected, state_dict, extra)
    check_weights(name, expected, state_dict)
    model.load_state_dict({k: own_weight(state_dict[k]) for k in expected}, strict=True, assign=True)
    model.requires_grad_(False)
    factor = float(state_dict[OUTPUT_SCALE_KEY]) if OUTPUT_SCALE_KEY in state_dict else 1.0
    scale = config["scale"]
    if factor != 1.0:
        model = OutputResize(model, factor)
        scale = round(scale * factor)
        name = f"{name} (x{config['scale']} network, output resized to x{scale})"
        config = {**config, "output_scale": factor}
    return ModelDescriptor(model, arch=arch, name=name, purpose="SR", scale=scale, size_multiple=size_multiple,
                           min_size=1, supports_half=True, supports_bf16=True, config=config,
                           bytes_per_px=bytes_per_px)


# ---------------------------------------------------------------------------- RRDBNet
def _detect_rrdb(state_dict: StateDict) -> bool:
    return has_all(state_dict, *_RRDB_KEYS)


def _load_rrdb(state_dict: StateDict) -> ModelDescriptor:
    num_feat, in_ch = shape_of(state_dict, "conv_first.weight", "RRDBNet", ndim=4)[:2]
    grow = shape_of(state_dict, "body.0.rdb1.conv1.weight", "RRDBNet", ndim=4)[0]
    out_ch = shape_of(state_dict, "conv_last.weight", "RRDBNet", ndim=4)[0]
    scale = {1: 4, 4: 2, 16: 1}.get(in_ch // out_ch if out_ch and in_ch % out_ch == 0 else 0)
    if scale is None or "conv_up1.weight" not in state_dict or "conv_up2.weight" not in state_dict:
        raise UnsupportedModelError(f"RRDBNet: conv_first takes {in_ch} channels and the file has "
                                    f"{'no' if 'conv_up2.weight' not in state_dict else 'its'} x4 upsampler: "
                                    "only the x4 / x2 / x1 layouts (3, 12 or 48 input channels) are known")
    config = {"scale": scale, "num_feat": num_feat, "num_block": _count(state_dict, "body.{}.rdb1.conv1.weight"),
              "num_grow_ch": grow, "num_in_ch": out_ch, "num_out_ch": out_ch}
    with torch.device("meta"):
        model = RRDBNet(**config)
    name = f"RRDBNet x{scale} ({config['num_block']} blocks)"
    # Peak float32 activations per input pixel (an estimate with a 1.25 margin): the dense block's features at
    # the trunk's size (1 / u^2 of the input pixels for unshuffle u) and two num_feat-channel maps at the output size.
    u = 4 // scale
    bpp = 1.25 * 4 * ((num_feat + 4 * grow) / (u * u) + 2 * num_feat * scale * scale)
    return _descriptor(model, state_dict, "esrgan", name, config, bpp, size_multiple={4: 1, 2: 2, 1: 4}[scale])


ESRGAN = Architecture(id="esrgan", name="ESRGAN / Real-ESRGAN (RRDBNet)", detect=_detect_rrdb, load=_load_rrdb,
                      wrapper_preference="params_ema", key_hints=_RRDB_KEYS)


# ---------------------------------------------------------------------------- SRVGGNetCompact
def _detect_compact(state_dict: StateDict) -> bool:
    if not has_all(state_dict, "body.0.weight", "body.1.weight", "body.2.weight"):
        return False
    w0, w1 = state_dict["body.0.weight"], state_dict["body.1.weight"]
    return w0.dim() == 4 and w1.dim() == 1  # conv then PReLU: the compact net's signature


def _load_compact(state_dict: StateDict) -> ModelDescriptor:
    n = _count(state_dict, "body.{}.weight")
    if n < 3 or n % 2 == 0:
        raise UnsupportedModelError(f"SRVGGNetCompact: {n} body layers; expected conv/PReLU pairs and a last conv")
    num_feat, in_ch = shape_of(state_dict, "body.0.weight", "SRVGGNetCompact", ndim=4)[:2]
    last = shape_of(state_dict, f"body.{n - 1}.weight", "SRVGGNetCompact", ndim=4)[0]
    r = round((last / in_ch) ** 0.5)
    if in_ch * r * r != last:
        raise UnsupportedModelError(f"SRVGGNetCompact: last conv has {last} outputs, not {in_ch} r^2")
    config = {"scale": r, "num_feat": num_feat, "num_conv": (n - 3) // 2, "num_in_ch": in_ch, "num_out_ch": in_ch}
    with torch.device("meta"):
        model = SRVGGNetCompact(**config)
    name = f"SRVGGNetCompact x{r} ({config['num_conv']} convs)"
    # Two num_feat maps at the input size and the pixel-shuffled output plus the upsampled input.
    return _descriptor(model, state_dict, "compact", name, config, 1.25 * 4 * (2 * num_feat + 2 * last))


COMPACT = Architecture(id="compact", name="Real-ESRGAN compact (SRVGGNetCompact)", detect=_detect_compact,
                       load=_load_compact, wrapper_preference="params", key_hints=("body.0.weight", "body.1.weight"))
