"""FeMaSR: key detection, configuration inference from tensor shapes, and the descriptor.

The descriptor's ``forward`` is the official inference path ``FeMaSRNet.test()``: pad bottom/right with
the symmetric mirror (flipped copy, edge pixel repeated) to ``(h // wsz + 1) * wsz`` with
``wsz = 8 // scale * 8`` -- always, even when the size is already a multiple -- run, and crop.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from ...descriptor import Architecture, ModelDescriptor, StateDict, check_layout, check_weights, has_all, shape_of
from ...descriptor import count_indexed as _count
from ...errors import InvalidInputError, UnsupportedModelError
from .network import FeMaSRConfig, FeMaSRNet, SwinConfig

__all__ = ["ARCHITECTURE", "FeMaSRDescriptor", "detect", "infer_config", "load", "pad_size", "symmetric_pad"]

DETECT_KEYS: tuple[str, ...] = (
    "multiscale_encoder.in_conv.weight",
    "multiscale_encoder.blocks.0.0.weight",
    "decoder_group.0.block.1.weight",
    "decoder_group.0.block.2.conv.2.weight",
    "out_conv.weight",
    "quantize_group.0.embedding.weight",
    "before_quant_group.0.weight",
    "after_quant_group.0.conv.weight",
)
# Released files carry tensors of modules the inference network does not have: QuanTexSR's SFT fusion
# layers, an older registration of the encoder upsamplers, and the HRP stage's semantic-loss head (a
# 1x1 conv and a VGG19 feature extractor).  The official loader ignores them (strict=False).
LEFTOVER_PREFIXES: tuple[str, ...] = (
    "sft_fusion_group.",
    "multiscale_encoder.upsampler.",
    "conv_semantic.",
    "vgg_feat_extractor.",
)
_ENC = "multiscale_encoder.blocks"

# Peak float32 activation memory per *input* pixel of one descriptor call on a 128x128 input, measured
# on CPU (channels_last) as the peak live heap (glibc with a fixed 64 KiB mmap threshold, so RSS tracks
# live tensors) minus the resident size before the call.  The peak sits in the last decoder stage:
# about 3.4 64-channel float32 maps at the padded output size (~870 B per padded output pixel), so it
# scales with scale**2; at 128x128 the always-on test() padding adds 27% (x4), 56% (x2), 125% (HRP)
# pixels, which makes these values conservative for larger tiles.
_BYTES_PER_PX = {4: 18400.0, 2: 5800.0, 1: 2300.0}


def detect(state_dict: StateDict) -> bool:
    """True for a FeMaSR generator (SR x2/x4 or the HRP autoencoder)."""
    return has_all(state_dict, *DETECT_KEYS)


def _infer_swin(state_dict: StateDict, prefix: str, dim: int) -> SwinConfig:
    num_layers = _count(state_dict, prefix + ".swin_blks.{}.conv.weight")
    blk = prefix + ".swin_blks.0.residual_group.blocks.{}"
    depth = _count(state_dict, blk + ".norm1.weight")
    if num_layers == 0 or depth == 0:
        raise UnsupportedModelError(f"FeMaSR Swin layers under {prefix!r} have no RSTB / Swin block")
    table = shape_of(state_dict, blk.format(0) + ".attn.relative_position_bias_table", "FeMaSR", ndim=2)
    ws = (math.isqrt(table[0]) + 1) // 2
    if (2 * ws - 1) ** 2 != table[0]:
        raise UnsupportedModelError(f"FeMaSR relative position table {table} is not (2*ws-1)^2 rows")
    num_heads = table[1]
    mlp_hidden = shape_of(state_dict, blk.format(0) + ".mlp.fc1.weight", "FeMaSR", ndim=2)[0]
    norm = shape_of(state_dict, blk.format(0) + ".norm1.weight", "FeMaSR", ndim=1)[0]
    if norm != dim or dim % num_heads:
        raise UnsupportedModelError(
            f"FeMaSR Swin width {norm} does not fit the latent's {dim} channels / {num_heads} heads"
        )
    # Shifted blocks are the ones with a stored attention mask (SwinIR: the odd ones).
    shifts: list[int] = []
    mask_resolution = 0
    for j in range(depth):
        key = blk.format(j) + ".attn_mask"
        if key in state_dict:
            n_windows = shape_of(state_dict, key, "FeMaSR", ndim=3)[0]
            mask_resolution = ws * math.isqrt(n_windows)
            shifts.append(ws // 2)
        else:
            shifts.append(0)
    return SwinConfig(num_layers, tuple(shifts), num_heads, ws, mlp_hidden, mask_resolution)


def infer_config(state_dict: StateDict) -> FeMaSRConfig:
    """Read FeMaSR's hyper-parameters from tensor shapes (leftover key families already removed).

    - stem / stride-2 blocks: ``multiscale_encoder.in_conv`` and every ``blocks.{d}.0`` conv;
    - SR vs HRP: a ``blocks.{d}.swin_blks`` group right after the stride-2 blocks (SR);
    - Swin: RSTB count, blocks per RSTB, heads and window from the bias table, MLP width, shifted
      blocks from the stored masks;
    - encoder upsamplers (SR): ``blocks.{d}.1`` after the Swin group;
    - codebook: ``quantize_group.0.embedding.weight`` (n_e, e_dim);
    - decoder: ``decoder_group.{i}.block.1`` convs; scale = 2**(decoder stages - stride-2 blocks).

    Raises:
        UnsupportedModelError: a layout the network cannot express.
    """
    in_shape = shape_of(state_dict, "multiscale_encoder.in_conv.weight", "FeMaSR", ndim=4)
    if in_shape[2:] != (4, 4):
        raise UnsupportedModelError(f"FeMaSR in_conv is {in_shape}, expected a 4x4 kernel")
    if "quantize_group.1.embedding.weight" in state_dict:
        raise UnsupportedModelError("FeMaSR with several codebooks is not supported (released models have one)")
    if any(k.endswith("running_mean") for k in state_dict):
        raise UnsupportedModelError(
            "FeMaSR with BatchNorm residual blocks is not supported (released models use GroupNorm)"
        )
    n_down = _count(state_dict, _ENC + ".{}.0.weight")
    down = tuple(shape_of(state_dict, f"{_ENC}.{d}.0.weight", "FeMaSR", ndim=4)[0] for d in range(n_down))
    latent_ch = down[-1]
    swin: SwinConfig | None = None
    up: tuple[int, ...] = ()
    if f"{_ENC}.{n_down}.swin_blks.0.conv.weight" in state_dict:
        swin = _infer_swin(state_dict, f"{_ENC}.{n_down}", latent_ch)
        n_up = _count(state_dict, _ENC + ".{}.1.weight", n_down + 1)
        ups = range(n_down + 1, n_down + 1 + n_up)
        up = tuple(shape_of(state_dict, f"{_ENC}.{d}.1.weight", "FeMaSR", ndim=4)[0] for d in ups)
    n_dec = _count(state_dict, "decoder_group.{}.block.1.weight")
    dec = tuple(shape_of(state_dict, f"decoder_group.{i}.block.1.weight", "FeMaSR", ndim=4)[0] for i in range(n_dec))
    n_e, e_dim = shape_of(state_dict, "quantize_group.0.embedding.weight", "FeMaSR", ndim=2)
    config = FeMaSRConfig(
        stem_channels=in_shape[0],
        down_channels=down,
        codebook_size=n_e,
        codebook_dim=e_dim,
        decoder_channels=dec,
        swin=swin,
        up_channels=up,
        in_channels=in_shape[1],
        out_channels=shape_of(state_dict, "out_conv.weight", "FeMaSR", ndim=4)[0],
    )
    if n_dec < n_down:
        raise UnsupportedModelError(
            f"FeMaSR with {n_dec} decoder stages and {n_down} encoder stride-2 blocks would downscale"
        )
    if config.scale not in (1, 2, 4, 8):
        raise UnsupportedModelError(f"FeMaSR scale {config.scale} is not supported (1, 2, 4 or 8)")
    if swin is not None:
        if len(up) != n_dec - 1 or up != dec[:-1]:
            raise UnsupportedModelError(
                f"FeMaSR encoder upsamplers {up} do not match the decoder stages {dec} they feed"
            )
    elif config.scale != 1:
        raise UnsupportedModelError("FeMaSR without Swin layers (HRP) must have scale 1")
    for c in (config.stem_channels, *down, *up, *dec):
        if c % config.num_groups:
            raise UnsupportedModelError(f"FeMaSR channel count {c} is not divisible by {config.num_groups} groups")
    return config


def pad_size(config: FeMaSRConfig) -> int:
    """The official ``test()`` padding multiple ``wsz = 8 // scale * 8`` (x4: 16, x2: 32, HRP: 64).

    For a non-released layout whose latent needs another multiple (window size times the encoder
    stride), the least common multiple of both keeps the padded input valid.
    """
    wsz = 8 // config.scale * 8
    need = config.latent_stride * (config.swin.window_size if config.swin is not None else 1)
    return math.lcm(wsz, need)


def symmetric_pad(x: Tensor, multiple: int) -> Tensor:
    """Pad bottom/right to ``(h // multiple + 1) * multiple`` (always at least 1 px) with the symmetric
    mirror (edge pixel repeated), exactly as FeMaSR's ``test()``.

    Args:
        x: (B, C, H, W), H and W >= multiple / 2 (the mirrored copy must cover the pad).
        multiple: padding multiple.

    Returns:
        (B, C, H', W') with H' = (H // multiple + 1) * multiple, same for W'.
    """
    h, w = x.shape[-2:]
    ph = (h // multiple + 1) * multiple - h
    pw = (w // multiple + 1) * multiple - w
    if ph > h or pw > w:
        raise InvalidInputError(f"image {w}x{h} is too small for a mirror pad of {pw}x{ph}")
    x = torch.cat((x, x[..., h - ph :, :].flip(-2)), dim=-2)
    return torch.cat((x, x[..., w - pw :].flip(-1)), dim=-1)


class FeMaSRDescriptor(ModelDescriptor):
    """FeMaSR x2/x4 (``purpose="SR"``) or the HRP autoencoder (``"Restoration"``, scale 1).

    ``forward`` is the official ``test()`` path.  GroupNorm statistics are global over the input, so a
    tile's output depends on the whole tile (tiles blend best with a generous overlap).

    Attributes:
        channels_last: run the network in channels_last memory format (faster on CPU; results equal).
    """

    model: FeMaSRNet

    def __init__(self, model: FeMaSRNet, *, channels_last: bool = True, **kwargs: Any) -> None:
        super().__init__(model, **kwargs)
        self.channels_last = channels_last

    @property
    def channels_last(self) -> bool:
        return self._channels_last

    @channels_last.setter
    def channels_last(self, value: bool) -> None:
        # Conv weights in the activations' format spare a weight copy in every convolution call.
        self._channels_last = bool(value)
        self.model.to(memory_format=torch.channels_last if value else torch.contiguous_format)

    def _check_image(self, x: Tensor) -> None:
        if not isinstance(x, Tensor) or x.dim() != 4 or x.shape[1] != self.in_channels:
            shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
            raise InvalidInputError(f"{self.name} expects a (B, {self.in_channels}, H, W) image tensor, got {shape}")
        h, w = x.shape[-2:]
        if min(h, w) < self.min_size:
            raise InvalidInputError(
                f"{self.name} needs images of at least {self.min_size}x{self.min_size} pixels, got {w}x{h}"
            )

    def _prepare_input(self, x: Tensor) -> Tensor:
        x = x.to(device=self.device, dtype=self.dtype)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return x

    @torch.inference_mode()
    def forward(self, x: Tensor, **context: Any) -> Tensor:
        """Restore / super-resolve like the official ``test()``.

        Args:
            x: (B, in_channels, H, W) in [0, 1], H and W >= ``min_size``.

        Returns:
            (B, out_channels, H*scale, W*scale), not clamped, contiguous.
        """
        if context:
            raise TypeError(f"{self.name} takes no options, got {sorted(context)}")
        return self.forward_with_indices(x)[0]

    __call__ = forward

    @torch.inference_mode()
    def forward_with_indices(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """:meth:`forward` plus the code indices of the padded input.

        Returns:
            image: (B, out_channels, H*scale, W*scale), not clamped, contiguous.
            indices: (B, 1, H'/stride, W'/stride) int64, H' x W' the padded size, stride the latent's.
        """
        self._check_image(x)
        h, w = x.shape[-2:]
        s = self.scale
        out, indices = self.model.forward_with_indices(self._prepare_input(symmetric_pad(x, self.size_multiple)))
        return out[..., : h * s, : w * s].contiguous(), indices


def _own(t: Tensor, like: Tensor) -> Tensor:
    """A fresh CPU copy of a checkpoint tensor: float32 for floating tensors (4-D ones channels_last),
    the buffer's dtype (int64 index tables) otherwise."""
    dtype = torch.float32 if like.is_floating_point() else like.dtype
    fmt = torch.channels_last if t.dim() == 4 else torch.contiguous_format
    return t.detach().to(device="cpu", dtype=dtype, memory_format=fmt, copy=True)


def load(state_dict: StateDict) -> FeMaSRDescriptor:
    """Build FeMaSR from a canonical state dict, inferring its configuration from the shapes.

    The leftover key families (``sft_fusion_group.``, ``multiscale_encoder.upsampler.``,
    ``conv_semantic.``, ``vgg_feat_extractor.``) are dropped and listed in ``ignored_keys``; every other
    tensor must fit the network (strict load).

    Raises:
        UnsupportedModelError: not a FeMaSR layout this network can run.
        CheckpointError: weights that are NaN/inf or not floating point (:func:`check_weights`).
    """
    ignored = [k for k in state_dict if k.startswith(LEFTOVER_PREFIXES)]
    sd = {k: v for k, v in state_dict.items() if not k.startswith(LEFTOVER_PREFIXES)}
    config = infer_config(sd)
    with torch.device("meta"):  # no random init: every tensor comes from the checkpoint
        model = FeMaSRNet(config)
    expected = model.state_dict()
    layout = f"scale {config.scale}, {'SR' if config.lq_stage else 'HRP'}"
    check_layout("FeMaSR", layout, expected, sd, [k for k in sd if k not in expected])
    check_weights("FeMaSR", expected, sd)
    # The model owns float32 copies (conv weights already channels_last, the descriptor's default).
    owned = {k: _own(sd[k], v) for k, v in expected.items()}
    try:
        model.load_state_dict(owned, strict=True, assign=True)
    except RuntimeError as e:
        raise UnsupportedModelError(f"FeMaSR tensor shapes do not fit the inferred layout: {e}") from e
    model.requires_grad_(False)
    wsz = pad_size(config)
    scale = config.scale
    return FeMaSRDescriptor(
        model,
        arch="femasr",
        name=f"FeMaSR x{scale}" if config.lq_stage else "FeMaSR HRP",
        purpose="SR" if config.lq_stage else "Restoration",
        scale=scale,
        in_channels=config.in_channels,
        out_channels=config.out_channels,
        size_multiple=wsz,
        min_size=wsz // 2,
        supports_half=True,
        supports_bf16=True,
        config=config.to_dict(),
        ignored_keys=ignored,
        bytes_per_px=_BYTES_PER_PX.get(scale, 1150.0 * scale * scale),
    )


ARCHITECTURE = Architecture(
    id="femasr",
    name="FeMaSR",
    detect=detect,
    load=load,
    wrapper_preference="params",
    key_hints=DETECT_KEYS,
)
