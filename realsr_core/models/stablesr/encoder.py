"""StableSR's time-aware encoder: multi-scale condition maps from the LR latent and the timestep.

Paper: J. Wang et al., "Exploiting Diffusion Prior for Real-World Image Super-Resolution" (StableSR),
IJCV 2024, section 3.1 and appendix A.  The encoder is a slimmed contracting path of the Stable
Diffusion UNet (256 base channels, ``channel_mult`` (1, 1, 2, 2), 2 residual blocks per level, legacy
QKV self-attention at downsampling factors 1, 2 and 4) whose residual blocks also take a timestep
embedding, so the strength of the condition can change over the diffusion process ("time-aware
guidance").  It records the feature map entering each downsample plus the middle-block output, and a
per-scale residual block (``fea_tran``) maps each one to ``out_channels`` (256); those maps drive the
SFT layers of the UNet (see ``sft.py``).

Sub-module names equal the released ``structcond_stage_model.*`` keys (without that prefix), so the
weights load unchanged::

    time_embed.{0,2}                         Linear(mc, 4mc), SiLU, Linear(4mc, 4mc)
    input_blocks.0.0                         3x3 conv, in_channels -> mc
    input_blocks.N.0.{in_layers.{0,2}, emb_layers.1, out_layers.{0,3}, skip_connection}   ResBlock
    input_blocks.N.1.{norm, qkv, proj_out}   legacy QKV attention block (optional)
    input_blocks.N.0.op                      3x3 stride-2 conv (Downsample)
    middle_block.{0,2}                       ResBlocks, middle_block.1 attention block
    fea_tran.{i}                             ResBlock, channels of scale i -> out_channels
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ...descriptor import StateDict, shape_of
from ...errors import InvalidInputError, UnsupportedModelError

__all__ = [
    "Downsample",
    "EncoderConfig",
    "GroupNorm32",
    "LegacyAttentionBlock",
    "TimeAwareEncoder",
    "TimestepResBlock",
    "TimestepSequential",
    "cond_by_shape",
    "infer_encoder_config",
    "select_cond",
    "timestep_embedding",
]

Cond = Mapping[Any, Tensor]
DEFAULT_NUM_HEADS = 4  # the released config (v2-finetune_text_T_512 / _768v): num_heads 4, num_head_channels -1


def timestep_embedding(timesteps: Tensor, dim: int, max_period: float = 10000.0) -> Tensor:
    """Sinusoidal timestep embedding, ``[cos, sin]`` order, always computed in float32.

    Frequencies are ``exp(-ln(max_period) * k / (dim // 2))`` for ``k = 0 .. dim//2 - 1``; an odd
    ``dim`` gets a trailing zero.  Kept in float32 whatever the model dtype, as the official code does,
    because timesteps up to 999 times these frequencies lose too much in float16.

    Args:
        timesteps: (B,) timesteps (original DDPM scale 0..999, may be fractional).
        dim: embedding size.
        max_period: the longest period.

    Returns:
        (B, dim) float32.
    """
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=timesteps.device) / half)
    args = timesteps.to(torch.float32)[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
    return emb


class GroupNorm32(nn.GroupNorm):
    """Affine GroupNorm computed in float32 (float64 stays float64), returned in the input dtype.

    Half-precision statistics over large maps are too coarse, so like the official ``GroupNorm32`` the
    normalisation is upcast; unlike it, a float64 input is not rounded down to float32.

    Shape:
        (B, C, *) -> (B, C, *).
    """

    def __init__(self, num_channels: int, num_groups: int = 32, eps: float = 1e-5) -> None:
        super().__init__(num_groups, num_channels, eps=eps, affine=True)

    def forward(self, x: Tensor) -> Tensor:
        ct = torch.float64 if x.dtype == torch.float64 else torch.float32
        w = None if self.weight is None else self.weight.to(ct)
        b = None if self.bias is None else self.bias.to(ct)
        return F.group_norm(x.to(ct), self.num_groups, w, b, self.eps).to(x.dtype)


class TimestepResBlock(nn.Module):
    """The ldm residual block with a timestep embedding (``ResBlock`` of the SD UNet, no up/down).

    ``out = skip(x) + out_layers(in_layers(x) + emb_layers(emb))`` where ``in_layers`` = GroupNorm,
    SiLU, 3x3 conv; ``emb_layers`` = SiLU, Linear; ``out_layers`` = GroupNorm, SiLU, (dropout: none at
    inference), 3x3 conv; ``skip`` is a 1x1 conv when the width changes.  With
    ``use_scale_shift_norm`` the embedding gives a scale and a shift applied after the second norm.

    Args:
        channels: input channels.
        emb_channels: timestep-embedding size.
        out_channels: output channels (default ``channels``).
        use_scale_shift_norm: FiLM-style conditioning instead of addition.

    Shape:
        x (B, channels, H, W), emb (B, emb_channels) -> (B, out_channels, H, W).
    """

    def __init__(
        self, channels: int, emb_channels: int, out_channels: int | None = None, use_scale_shift_norm: bool = False
    ) -> None:
        super().__init__()
        out = channels if out_channels is None else out_channels
        self.out_channels = out
        self.use_scale_shift_norm = use_scale_shift_norm
        self.in_layers = nn.Sequential(GroupNorm32(channels), nn.SiLU(), nn.Conv2d(channels, out, 3, padding=1))
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(emb_channels, 2 * out if use_scale_shift_norm else out))
        # Index 2 is the (parameter-free) dropout of the training code; kept as Identity for the key names.
        self.out_layers = nn.Sequential(GroupNorm32(out), nn.SiLU(), nn.Identity(), nn.Conv2d(out, out, 3, padding=1))
        self.skip_connection: nn.Module = nn.Identity() if out == channels else nn.Conv2d(channels, out, 1)

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        h = self.in_layers(x)
        emb_out = self.emb_layers(emb).to(h.dtype)[:, :, None, None]
        if self.use_scale_shift_norm:
            scale, shift = emb_out.chunk(2, dim=1)
            h = torch.addcmul(shift, self.out_layers[0](h), 1 + scale)
            h = self.out_layers[1:](h)
        else:
            h = self.out_layers(h + emb_out)
        return self.skip_connection(x) + h


class LegacyAttentionBlock(nn.Module):
    """Spatial self-attention with the legacy ``qkv`` layout of the ldm ``AttentionBlock``.

    ``x + proj_out(attention(qkv(norm(x))))`` over the H*W positions.  The fused 1x1 ``qkv`` projection
    is laid out head by head, each head holding its ``q``, ``k`` and ``v`` channels in turn
    (``QKVAttentionLegacy``).  The attention runs through ``scaled_dot_product_attention`` (scale
    ``1/sqrt(head_dim)``), so no H*W x H*W matrix is kept on backends with fused kernels; that matters
    because this block runs at the full latent resolution.

    Args:
        channels: feature channels.
        num_heads: attention heads, used when ``num_head_channels`` is -1.
        num_head_channels: channels per head (then ``channels // num_head_channels`` heads), or -1.

    Shape:
        (B, channels, H, W) -> (B, channels, H, W).
    """

    def __init__(self, channels: int, num_heads: int = 1, num_head_channels: int = -1) -> None:
        super().__init__()
        if num_head_channels == -1:
            heads = num_heads
        else:
            if channels % num_head_channels:
                raise UnsupportedModelError(
                    f"attention width {channels} is not divisible by num_head_channels {num_head_channels}"
                )
            heads = channels // num_head_channels
        if heads < 1 or channels % heads:
            raise UnsupportedModelError(f"attention width {channels} cannot be split into {heads} heads")
        self.num_heads = heads
        self.norm = GroupNorm32(channels)
        self.qkv = nn.Conv1d(channels, 3 * channels, 1)
        self.proj_out = nn.Conv1d(channels, channels, 1)

    def forward(self, x: Tensor) -> Tensor:
        b, c = x.shape[:2]
        flat = x.reshape(b, c, -1)
        n = flat.shape[-1]
        qkv = self.qkv(self.norm(flat))  # (B, 3C, N), per head [q | k | v]
        # (B, heads, N, 3d) with unit stride on the channel axis: the fused (flash / memory-efficient)
        # kernels require it, otherwise SDPA falls back to materialising the N x N matrix.
        qkv = qkv.reshape(b, self.num_heads, 3 * c // self.num_heads, n).transpose(-1, -2).contiguous()
        q, k, v = qkv.chunk(3, dim=-1)
        h = F.scaled_dot_product_attention(q, k, v)  # (B, heads, N, C/heads)
        h = h.transpose(-1, -2).reshape(b, c, n)
        return (flat + self.proj_out(h)).reshape(x.shape)


class Downsample(nn.Module):
    """3x3 stride-2 convolution (``op``); output size ``ceil(H/2) x ceil(W/2)``.

    Shape:
        (B, C, H, W) -> (B, C, ceil(H/2), ceil(W/2)).
    """

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.op = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.op(x)


class TimestepSequential(nn.Sequential):
    """A Sequential that hands the timestep embedding to the residual blocks it holds."""

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:  # type: ignore[override]
        for layer in self:
            x = layer(x, emb) if isinstance(layer, TimestepResBlock) else layer(x)
        return x


@dataclass(frozen=True)
class EncoderConfig:
    """Constructor arguments of :class:`TimeAwareEncoder` (names of the official config).

    ``num_heads`` / ``num_head_channels`` are not stored in the weights: the default is the released
    config (4 heads); other checkpoints must say theirs.
    """

    in_channels: int = 4
    model_channels: int = 256
    out_channels: int = 256
    num_res_blocks: int = 2
    attention_resolutions: tuple[int, ...] = (4, 2, 1)
    channel_mult: tuple[int, ...] = (1, 1, 2, 2)
    num_heads: int = DEFAULT_NUM_HEADS
    num_head_channels: int = -1
    use_scale_shift_norm: bool = False
    time_embed_dim: int = field(default=0)  # 0: 4 * model_channels

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["attention_resolutions"] = list(self.attention_resolutions)
        d["channel_mult"] = list(self.channel_mult)
        d["time_embed_dim"] = self.emb_channels
        return d

    @property
    def emb_channels(self) -> int:
        return self.time_embed_dim or 4 * self.model_channels


class TimeAwareEncoder(nn.Module):
    """StableSR's time-aware encoder (``EncoderUNetModelWT``).

    Args:
        config: the architecture (see :class:`EncoderConfig`).

    The encoder keeps one condition map per resolution level: the input of each Downsample and the
    middle-block output, each through its ``fea_tran`` block, i.e. ``len(channel_mult)`` maps of
    ``out_channels`` channels at sizes H, ceil(H/2), ... (H/8 for the released model).
    """

    def __init__(self, config: EncoderConfig | None = None) -> None:
        super().__init__()
        cfg = config or EncoderConfig()
        self.config = cfg
        mc, emb_ch = cfg.model_channels, cfg.emb_channels
        self.time_embed = nn.Sequential(nn.Linear(mc, emb_ch), nn.SiLU(), nn.Linear(emb_ch, emb_ch))

        def res(cin: int, cout: int) -> TimestepResBlock:
            return TimestepResBlock(cin, emb_ch, cout, cfg.use_scale_shift_norm)

        def attn(ch: int) -> LegacyAttentionBlock:
            return LegacyAttentionBlock(ch, cfg.num_heads, cfg.num_head_channels)

        blocks: list[nn.Module] = [TimestepSequential(nn.Conv2d(cfg.in_channels, mc, 3, padding=1))]
        level_channels: list[int] = []  # channels of the map recorded at each level
        ch, ds = mc, 1
        for level, mult in enumerate(cfg.channel_mult):
            for _ in range(cfg.num_res_blocks):
                layers: list[nn.Module] = [res(ch, mult * mc)]
                ch = mult * mc
                if ds in cfg.attention_resolutions:
                    layers.append(attn(ch))
                blocks.append(TimestepSequential(*layers))
            if level != len(cfg.channel_mult) - 1:
                level_channels.append(ch)
                blocks.append(TimestepSequential(Downsample(ch)))
                ds *= 2
        self.input_blocks = nn.ModuleList(blocks)
        self.middle_block = TimestepSequential(res(ch, ch), attn(ch), res(ch, ch))
        level_channels.append(ch)
        self.fea_tran = nn.ModuleList([res(c, cfg.out_channels) for c in level_channels])

    @property
    def dtype(self) -> torch.dtype:
        return self.time_embed[0].weight.dtype

    def forward_levels(self, x: Tensor, timesteps: Tensor | float | int) -> list[Tensor]:
        """The condition maps in level order (finest first).

        Args:
            x: (B, in_channels, h, w) scaled LR latent (``0.18215 * VAE.encode(LR)``), any float dtype
                (computed in the encoder's dtype).
            timesteps: (B,) or scalar (or (1,), broadcast) original DDPM timesteps 0..999.

        Returns:
            ``len(channel_mult)`` tensors (B, out_channels, h_i, w_i) with h_0 = h and
            h_{i+1} = ceil(h_i / 2); the last one comes from the middle block (deepest level).
        """
        if not isinstance(x, Tensor) or x.dim() != 4 or x.shape[1] != self.config.in_channels:
            shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
            raise InvalidInputError(
                f"time-aware encoder expects a (B, {self.config.in_channels}, h, w) latent tensor, got {shape}"
            )
        b = x.shape[0]
        p = self.time_embed[0].weight
        t = torch.as_tensor(timesteps, device=p.device).reshape(-1)
        if t.numel() == 1 and b != 1:
            t = t.expand(b)
        if t.numel() != b:
            raise InvalidInputError(f"time-aware encoder got {t.numel()} timesteps for a batch of {b} latents")
        emb = self.time_embed(timestep_embedding(t, self.config.model_channels).to(p.dtype))
        h = x.to(device=p.device, dtype=p.dtype)
        levels: list[Tensor] = []
        for block in self.input_blocks:
            if isinstance(block[0], Downsample):
                levels.append(h)
            h = block(h, emb)
        levels.append(self.middle_block(h, emb))
        return [tran(f, emb) for tran, f in zip(self.fea_tran, levels, strict=True)]

    def forward(self, x: Tensor, timesteps: Tensor | float | int) -> dict[str, Tensor]:
        """The official output: condition maps keyed by ``str(width)``.

        Args:
            x: (B, in_channels, h, w) scaled LR latent.
            timesteps: (B,) original timesteps 0..999 (a scalar is broadcast).

        Returns:
            ``{str(w_i): (B, out_channels, h_i, w_i)}`` in level order, e.g. keys
            ``'64', '32', '16', '8'`` for a 64x64 latent.  As in the official code a deeper map
            replaces a shallower one of the same width (only once the width has reached 1 and stops
            halving); use :meth:`forward_by_shape` to look maps up by (h, w).
        """
        return {str(f.shape[-1]): f for f in self.forward_levels(x, timesteps)}

    def forward_by_shape(self, x: Tensor, timesteps: Tensor | float | int) -> dict[tuple[int, int], Tensor]:
        """Condition maps keyed by ``(h_i, w_i)`` (see :func:`cond_by_shape`)."""
        return cond_by_shape(self.forward_levels(x, timesteps))


def cond_by_shape(levels: Iterable[Tensor]) -> dict[tuple[int, int], Tensor]:
    """Key condition maps by their spatial size ``(h, w)`` instead of the width alone.

    Width keys (the official choice) collide when two levels share a width but not a height, e.g. a
    latent 2 wide: every level after the first is 1 wide, and the official lookup would hand a UNet
    feature the wrong map.  Keying on (h, w) removes that; when two maps share (h, w) as well (a side
    that no longer halves), the deeper one wins, as in the official width dict.

    Args:
        levels: maps in level order, each (B, C, h, w).

    Returns:
        ``{(h, w): map}``.
    """
    return {(int(f.shape[-2]), int(f.shape[-1])): f for f in levels}


def select_cond(cond: Cond, feature: Tensor) -> Tensor:
    """Pick the condition map for a UNet feature from an encoder output dict.

    Lookup order: the ``(h, w)`` key (from :func:`cond_by_shape`), then the official ``str(w)`` key.
    A map whose spatial size still differs from the feature's (a width-only match) is resized with
    nearest-neighbour sampling, as SPADE resizes its segmentation map to the normalised feature.

    Args:
        cond: ``{(h, w): map}`` or ``{str(w): map}`` of (B_c, C, h, w) maps.
        feature: (B, C', H, W) the feature to modulate.

    Returns:
        (B_c, C, H, W).

    Raises:
        InvalidInputError: no map fits; the message lists the available keys.
    """
    h, w = int(feature.shape[-2]), int(feature.shape[-1])
    seg = cond.get((h, w))
    if seg is None:
        seg = cond.get(str(w))
    if seg is None:
        raise InvalidInputError(
            f"no StableSR condition map for a {h}x{w} UNet feature (available: {list(cond)}); the time-aware "
            "encoder must run on the same latent crop as the UNet"
        )
    if tuple(seg.shape[-2:]) != (h, w):
        seg = F.interpolate(seg, size=(h, w), mode="nearest")
    return seg


# ---------------------------------------------------------------------------- configuration inference
_WHAT = "StableSR time-aware encoder"


def _res_out(sd: StateDict, prefix: str, file_prefix: str = "") -> int | None:
    key = prefix + "in_layers.2.weight"
    return shape_of(sd, key, _WHAT, ndim=4, file_prefix=file_prefix)[0] if key in sd else None


def infer_encoder_config(
    state_dict: StateDict, num_heads: int = DEFAULT_NUM_HEADS, num_head_channels: int = -1, file_prefix: str = ""
) -> EncoderConfig:
    """Encoder architecture from tensor shapes.

    Args:
        state_dict: the encoder's keys (``time_embed.0.weight``, ``input_blocks...``; no
            ``structcond_stage_model.`` prefix).
        num_heads, num_head_channels: attention split, which the weights do not record (default:
            the released 4 heads).
        file_prefix: the keys' prefix in the file (``structcond_stage_model.``), for messages.

    Raises:
        UnsupportedModelError: keys or shapes that do not form an ``EncoderUNetModelWT``.
    """
    for key in (
        "time_embed.0.weight",
        "time_embed.2.weight",
        "input_blocks.0.0.weight",
        "fea_tran.0.in_layers.2.weight",
    ):
        if key not in state_dict:
            raise UnsupportedModelError(f"StableSR time-aware encoder: missing key {key!r}")
    mc, in_ch = shape_of(state_dict, "input_blocks.0.0.weight", _WHAT, ndim=4, file_prefix=file_prefix)[:2]
    emb_ch, te_in = shape_of(state_dict, "time_embed.0.weight", _WHAT, ndim=2, file_prefix=file_prefix)
    if te_in != mc:
        raise UnsupportedModelError(
            f"StableSR time-aware encoder: time_embed.0 takes {te_in} inputs, expected model_channels {mc}"
        )
    levels: list[list[tuple[int, bool]]] = [[]]  # per level: (out channels, has attention) per ResBlock
    i = 1
    while True:
        p = f"input_blocks.{i}."
        if p + "0.op.weight" in state_dict:
            levels.append([])
        elif (out := _res_out(state_dict, p + "0.", file_prefix)) is not None:
            levels[-1].append((out, p + "1.qkv.weight" in state_dict))
        elif any(k.startswith(p) for k in state_dict):
            raise UnsupportedModelError(
                f"StableSR time-aware encoder: input_blocks.{i} is neither a ResBlock nor a conv Downsample "
                "(resblock_updown / conv_resample=False variants are not supported)"
            )
        else:
            break
        i += 1
    nrb = {len(lv) for lv in levels}
    if len(nrb) != 1 or 0 in nrb:
        raise UnsupportedModelError(
            f"StableSR time-aware encoder: levels have {[len(lv) for lv in levels]} ResBlocks, expected the same "
            "number (>= 1) at every level"
        )
    mult: list[int] = []
    attn_res: list[int] = []
    for li, lv in enumerate(levels):
        chans = {c for c, _ in lv}
        attn = {a for _, a in lv}
        if len(chans) != 1 or len(attn) != 1 or next(iter(chans)) % mc:
            raise UnsupportedModelError(
                f"StableSR time-aware encoder: level {li} has ResBlock widths {sorted(chans)} and attention "
                f"{sorted(attn)}; expected one multiple of {mc} and the same attention for every block"
            )
        mult.append(next(iter(chans)) // mc)
        if next(iter(attn)):
            attn_res.append(2**li)
    n_tran = 0
    while f"fea_tran.{n_tran}.in_layers.2.weight" in state_dict:
        n_tran += 1
    if n_tran != len(levels):
        raise UnsupportedModelError(
            f"StableSR time-aware encoder: {n_tran} fea_tran blocks for {len(levels)} levels (expected one per level)"
        )
    out_ch = shape_of(state_dict, "fea_tran.0.in_layers.2.weight", _WHAT, ndim=4, file_prefix=file_prefix)[0]
    emb1 = "input_blocks.1.0.emb_layers.1.weight"
    scale_shift = (
        emb1 in state_dict
        and shape_of(state_dict, emb1, _WHAT, ndim=2, file_prefix=file_prefix)[0] == 2 * mult[0] * mc
    )
    return EncoderConfig(
        in_channels=in_ch,
        model_channels=mc,
        out_channels=out_ch,
        num_res_blocks=nrb.pop(),
        attention_resolutions=tuple(attn_res),
        channel_mult=tuple(mult),
        num_heads=num_heads,
        num_head_channels=num_head_channels,
        use_scale_shift_norm=scale_shift,
        time_embed_dim=emb_ch,
    )
