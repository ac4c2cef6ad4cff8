"""Read ncnn model files (``.param`` graph + ``.bin`` weights) into a state dict with the released PyTorch names.

No ncnn runtime is needed: the ``.param`` text lists the layers (type, name, input / output blobs, ``key=value``
parameters) and the ``.bin`` holds each weighted layer's data in graph order.  The graph is matched against the
architectures users have in this format -- Real-ESRGAN / ESRGAN's RRDBNet (any block count; the x2 / x1 models'
pixel-unshuffle in front) and Real-ESRGAN's compact net (realesr-animevideov3), including a trailing resize of
the output -- as the old onnx2ncnn files of the releases write them (``Eltwise`` adds) and as ncnn's current
converter pnnx does (``BinaryOp`` adds, the pixel-unshuffle as one ``Reorg``), and turned into the BasicSR /
spandrel key layout, so :mod:`realsr_core.models.esrgan` builds it,
our tiler and LWay run it, and ``python -m realsr_core convert`` writes a file spandrel and ComfyUI read.

``.bin`` layout (ncnn ``ModelBin``): a Convolution's weight is stored with a 4-byte tag (``0`` = float32,
``0x01306B47`` = float16) and padded to 4 bytes; its bias and a PReLU's slopes are raw float32.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from .errors import CheckpointError, UnsupportedModelError

__all__ = ["Layer", "read_graph", "read_ncnn", "to_state_dict"]

MAGIC = 7767517
_FP16_TAG, _FP32_TAG = 0x01306B47, 0
_KNOWN = {"Input", "Convolution", "Split", "Concat", "Eltwise", "BinaryOp", "Interp", "PReLU", "PixelShuffle",
          "Reshape", "Permute", "Reorg"}


@dataclass
class Layer:
    """One line of a ``.param`` file; ``params`` maps ncnn's integer keys to numbers (arrays: lists)."""

    type: str
    name: str
    inputs: list[str]
    outputs: list[str]
    params: dict[int, float | list[float]] = field(default_factory=dict)
    weights: dict[str, Tensor] = field(default_factory=dict)

    def param(self, key: int, default: int = 0) -> int:
        v = self.params.get(key, default)
        return int(v[0] if isinstance(v, list) else v)


def read_graph(param: str | Path) -> list[Layer]:
    """The layers of a ``.param`` file, in order (text format)."""
    p = Path(param)
    try:
        lines = [ln.split() for ln in p.read_text().splitlines() if ln.strip()]
    except (OSError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{p.name}: not a readable ncnn .param text file: {e}") from None
    if not lines or lines[0] != [str(MAGIC)] or len(lines) < 2:
        raise CheckpointError(f"{p.name}: not an ncnn .param file (the first line is not {MAGIC})")
    layers = []
    for tokens in lines[2:]:
        kind, name, n_in, n_out = tokens[0], tokens[1], int(tokens[2]), int(tokens[3])
        rest = tokens[4:]
        params: dict[int, float | list[float]] = {}
        for kv in rest[n_in + n_out:]:
            k, v = kv.split("=", 1)
            key = int(k)
            if key <= -23300:  # an array parameter: key -23300 - k, value "count,x1,x2,..."
                params[-23300 - key] = [float(x) for x in v.split(",")[1:]]
            else:
                params[key] = float(v)
        layers.append(Layer(kind, name, rest[:n_in], rest[n_in:n_in + n_out], params))
    return layers


def _read_weights(layers: list[Layer], data: bytes, name: str) -> None:
    """Fill each Convolution / PReLU layer's tensors from the ``.bin`` bytes (graph order)."""
    pos = 0

    def take(n: int) -> bytes:
        nonlocal pos
        if pos + n > len(data):
            raise CheckpointError(f"{name}: the .bin ends at byte {len(data)}, the graph needs more (truncated or "
                                  "not the .bin of this .param)")
        out = data[pos:pos + n]
        pos += n
        return out

    for layer in layers:
        if layer.type == "Convolution":
            out_ch, k, size = layer.param(0), layer.param(1), layer.param(6)
            tag = int.from_bytes(take(4), "little")
            if tag == _FP16_TAG:
                w = np.frombuffer(take(size * 2), dtype=np.float16).astype(np.float32)
                take((-size * 2) % 4)  # ncnn aligns each blob to 4 bytes
            elif tag == _FP32_TAG:
                w = np.frombuffer(take(size * 4), dtype=np.float32)
            else:
                raise UnsupportedModelError(f"{name}: layer {layer.name} stores weights with tag {tag:#x} (quantised?); "
                                            "only float32 and float16 ncnn files are read")
            in_ch = size // (out_ch * k * k)
            if in_ch * out_ch * k * k != size or layer.param(2, 1) != 1 or layer.param(3, 1) != 1 or layer.param(4) != k // 2:
                raise UnsupportedModelError(f"{name}: layer {layer.name} is not a stride-1, same-padding convolution")
            layer.weights["weight"] = torch.from_numpy(w.copy()).reshape(out_ch, in_ch, k, k)
            if layer.param(5):
                layer.weights["bias"] = torch.from_numpy(np.frombuffer(take(out_ch * 4), dtype=np.float32).copy())
        elif layer.type == "PReLU":
            n = layer.param(0)
            layer.weights["weight"] = torch.from_numpy(np.frombuffer(take(n * 4), dtype=np.float32).copy())
    if pos != len(data):
        raise CheckpointError(f"{name}: the graph uses {pos} bytes of the {len(data)}-byte .bin (not its .bin?)")


def _leaky(layer: Layer) -> bool:
    """A Convolution with LeakyReLU(0.2) fused (activation type 2)."""
    return layer.param(9) == 2 and abs(float(layer.params.get(10, [0.0])[0]) - 0.2) < 1e-6


def _conv_keys(prefix: str, layer: Layer) -> dict[str, Tensor]:
    return {f"{prefix}.{k}": v for k, v in layer.weights.items()}


def _first_conv_weight(layers: list[Layer], first: Layer, name: str) -> Tensor:
    """``conv_first``'s weight with its input channels in ``F.pixel_unshuffle``'s order (what RRDBNet runs).

    pnnx writes an x2 / x1 model's unshuffle as ``Reorg`` (stride u): mode 0 orders the channels as PyTorch does
    (channel ``c * u^2 + k`` for the k-th pixel of a u x u cell), mode 1 cell-major (``k * 3 + c``), which a
    permutation of the weight's input channels turns into PyTorch's.  Checked against the ncnn runtime.
    """
    w = first.weights["weight"]
    reorgs = [lr for lr in layers[:layers.index(first)] if lr.type == "Reorg"]
    if not reorgs:
        return w
    u, mode = reorgs[0].param(0), reorgs[0].param(1)
    if len(reorgs) > 1 or u not in (2, 4) or mode not in (0, 1) or w.shape[1] != 3 * u * u:
        raise UnsupportedModelError(f"{name}: {len(reorgs)} Reorg layer(s) (stride {u}, mode {mode}) before a "
                                    f"{w.shape[1]}-channel first convolution; expected one pixel-unshuffle by 2 or 4")
    if mode == 0:
        return w
    return w.reshape(w.shape[0], u * u, 3, *w.shape[2:]).transpose(1, 2).reshape(w.shape).contiguous()


def _rrdb(layers: list[Layer], convs: list[Layer], name: str) -> dict[str, Tensor]:
    interps = [lr for lr in layers if lr.type == "Interp"]
    if len(interps) != 2 or any(lr.param(0) != 1 for lr in interps):
        raise UnsupportedModelError(f"{name}: RRDBNet graph with {len(interps)} resize layer(s); expected two x2 nearest")
    body = (len(convs) - 6) // 15
    if body < 1 or len(convs) != 15 * body + 6:
        raise UnsupportedModelError(f"{name}: {len(convs)} convolutions do not form RRDBNet (15 per block + 6)")
    sd = {**_conv_keys("conv_first", convs[0]), "conv_first.weight": _first_conv_weight(layers, convs[0], name)}
    it = iter(convs[1:])
    for b in range(body):
        for r in (1, 2, 3):
            for c in range(1, 6):
                conv = next(it)
                if _leaky(conv) != (c < 5):
                    raise UnsupportedModelError(f"{name}: {conv.name} breaks the dense-block pattern")
                sd.update(_conv_keys(f"body.{b}.rdb{r}.conv{c}", conv))
    for key in ("conv_body", "conv_up1", "conv_up2", "conv_hr", "conv_last"):
        sd.update(_conv_keys(key, next(it)))
    return sd


def _compact(layers: list[Layer], convs: list[Layer], name: str) -> dict[str, Tensor]:
    prelus = [lr for lr in layers if lr.type == "PReLU"]
    shuffles = [lr for lr in layers if lr.type == "PixelShuffle"]
    if len(prelus) != len(convs) - 1 or len(shuffles) != 1:
        raise UnsupportedModelError(f"{name}: {len(convs)} convolutions, {len(prelus)} PReLU, {len(shuffles)} pixel "
                                    "shuffle(s) do not form the compact net (conv + PReLU pairs, a last conv, a shuffle)")
    sd: dict[str, Tensor] = {}
    i = 0
    for layer in layers:
        if layer.type in ("Convolution", "PReLU"):
            sd.update(_conv_keys(f"body.{i}", layer))
            i += 1
    # The input is nearest-upsampled and added after the shuffle; anything resized after that add is the output.
    add = next((n for n, lr in enumerate(layers) if lr.type == "BinaryOp"), None)
    after = [lr for lr in layers[add + 1:] if lr.type == "Interp"] if add is not None else []
    if len(after) > 1:
        raise UnsupportedModelError(f"{name}: more than one resize after the network's output")
    if after:
        factor = float(after[0].params.get(1, 1.0))
        if after[0].param(0) != 3 or factor != float(after[0].params.get(2, factor)):
            raise UnsupportedModelError(f"{name}: the output resize is not a uniform bicubic one")
        sd["ncnn.output_scale"] = torch.tensor(factor)
    return sd


def to_state_dict(layers: list[Layer], name: str = "the ncnn file") -> dict[str, Tensor]:
    """Match a graph (with weights) against the known architectures; their released key layout, or a refusal."""
    types = sorted({lr.type for lr in layers})
    unknown = [t for t in types if t not in _KNOWN]
    convs = [lr for lr in layers if lr.type == "Convolution"]
    if unknown or not convs:
        raise UnsupportedModelError(f"{name}: ncnn graph with layers {types}; only RRDBNet (ESRGAN / Real-ESRGAN) and "
                                    "Real-ESRGAN's compact net are recognised" + (f" ({unknown} unknown)" if unknown else ""))
    # x2 / x1 RRDBNet pixel-unshuffle the input before conv_first (onnx2ncnn: Reshape, Permute, Reshape; pnnx: one
    # Reorg, see _first_conv_weight); conv_first's 12 / 48 input channels tell the scale.
    if "PReLU" in types:
        return _compact(layers, convs, name)
    if "Concat" in types and ("Eltwise" in types or "BinaryOp" in types):
        return _rrdb(layers, convs, name)
    raise UnsupportedModelError(f"{name}: ncnn graph with layers {types} is neither RRDBNet nor the compact net")


def read_ncnn(param: str | Path) -> dict[str, Tensor]:
    """The state dict (released PyTorch names) of ``x.param`` and the ``x.bin`` beside it.

    Raises:
        CheckpointError: a missing / unreadable file, a ``.bin`` of the wrong size.
        UnsupportedModelError: a graph of another architecture (naming its layer types), quantised weights.
    """
    p = Path(param)
    if p.suffix.lower() != ".param":
        raise CheckpointError(f"{p.name}: an ncnn model is read from its .param file")
    bin_path = p.with_suffix(".bin")
    if not p.is_file() or not bin_path.is_file():
        missing = p if not p.is_file() else bin_path
        raise CheckpointError(f"{missing}: not found (an ncnn model needs its .param and .bin side by side)")
    layers = read_graph(p)
    _read_weights(layers, bin_path.read_bytes(), p.name)
    return to_state_dict(layers, p.name)

