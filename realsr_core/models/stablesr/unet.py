"""A host-agnostic Stable Diffusion 2.x UNet (ldm ``openaimodel.UNetModel`` layout) with StableSR's SFT hook.

StableSR keeps the SD 2.1 UNet frozen and modulates the residual branch of every ResBlock with an SFT
layer driven by the time-aware encoder (``UNetModelDualcondV2``).  This module is the plain UNet; the
SFT layers live in ``sft.py`` and are applied by :func:`resblock_forward_with_sft` when ``forward`` gets
both ``sft`` and ``struct_cond``.  It serves the CLI and the tests; inside ComfyUI the host's own UNet
is patched instead.

Sub-module names equal the released ``model.diffusion_model.*`` keys::

    time_embed.{0,2}                          Linear(mc, 4mc), SiLU, Linear(4mc, 4mc)
    input_blocks.0.0                          3x3 conv, in_channels -> mc
    input_blocks.N.0 / output_blocks.N.0      ResBlock (in_layers, emb_layers, out_layers, skip_connection)
    *.N.1                                     SpatialTransformer (norm, proj_in, transformer_blocks.D.{attn1,
                                              ff, attn2, norm1..3}, proj_out)
    input_blocks.N.0.op                       Downsample (3x3 stride-2 conv)
    output_blocks.N.{1,2}.conv                Upsample (nearest x2 + 3x3 conv)
    middle_block.{0,1,2}                      ResBlock, SpatialTransformer, ResBlock
    out.{0,2}                                 GroupNorm, SiLU, 3x3 conv

SD 2.1 (512 and 768-v): model_channels 320, channel_mult (1, 2, 4, 4), 2 ResBlocks per level, attention
at downsampling factors 1, 2, 4, 64 channels per head, linear projections, context 1024.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ...descriptor import StateDict
from ...errors import InvalidInputError, UnsupportedModelError
from .encoder import Downsample, GroupNorm32, TimestepResBlock, timestep_embedding
from .sft import SFTLayers, resblock_forward_with_sft

__all__ = [
    "UNET_PREFIX",
    "BasicTransformerBlock",
    "CrossAttention",
    "SpatialTransformer",
    "StableSRUNet",
    "UNetConfig",
    "Upsample",
    "infer_unet_config",
    "load_unet",
    "unet_state_dict",
]

UNET_PREFIX: str = "model.diffusion_model."
# Channels per head of SD 2.x; SD 1.x uses 8 heads instead.  Neither is stored in the weights.
SD2_HEAD_CHANNELS: int = 64
SD1_NUM_HEADS: int = 8


# ---------------------------------------------------------------------------- transformer
class CrossAttention(nn.Module):
    """Multi-head (cross-)attention ``to_out(softmax(q k^T / sqrt(d)) v)`` via SDPA.

    Args:
        query_dim: channels of the query tokens.
        context_dim: channels of the key/value tokens (``None``: self-attention).
        heads: number of heads.
        dim_head: channels per head.

    Shape:
        x (B, N, query_dim), context (B, M, context_dim) -> (B, N, query_dim).
    """

    def __init__(self, query_dim: int, context_dim: int | None, heads: int, dim_head: int) -> None:
        super().__init__()
        inner = heads * dim_head
        kv_dim = query_dim if context_dim is None else context_dim
        self.heads = heads
        self.to_q = nn.Linear(query_dim, inner, bias=False)
        self.to_k = nn.Linear(kv_dim, inner, bias=False)
        self.to_v = nn.Linear(kv_dim, inner, bias=False)
        # Index 1 is the (inference-time no-op) dropout of the training code.
        self.to_out = nn.Sequential(nn.Linear(inner, query_dim), nn.Identity())

    def forward(self, x: Tensor, context: Tensor | None = None) -> Tensor:
        ctx = x if context is None else context
        b, n, _ = x.shape
        q, k, v = self.to_q(x), self.to_k(ctx), self.to_v(ctx)
        q, k, v = (a.reshape(b, a.shape[1], self.heads, -1).transpose(1, 2) for a in (q, k, v))
        h = F.scaled_dot_product_attention(q, k, v)  # (B, heads, N, dim_head)
        return self.to_out(h.transpose(1, 2).reshape(b, n, -1))


class GEGLU(nn.Module):
    """``a * gelu(g)`` with ``[a, g] = proj(x)`` (the gated feed-forward input of SD's transformer)."""

    def __init__(self, dim_in: int, dim_out: int) -> None:
        super().__init__()
        self.proj = nn.Linear(dim_in, 2 * dim_out)

    def forward(self, x: Tensor) -> Tensor:
        a, gate = self.proj(x).chunk(2, dim=-1)
        return a * F.gelu(gate)


class FeedForward(nn.Module):
    """GEGLU feed-forward, 4x inner width: ``net = [GEGLU, dropout, Linear]``."""

    def __init__(self, dim: int, mult: int = 4) -> None:
        super().__init__()
        self.net = nn.Sequential(GEGLU(dim, dim * mult), nn.Identity(), nn.Linear(dim * mult, dim))

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


class BasicTransformerBlock(nn.Module):
    """Pre-norm transformer block: self-attention, cross-attention to the text context, feed-forward.

    Shape:
        x (B, N, dim), context (B, M, context_dim) -> (B, N, dim).
    """

    def __init__(self, dim: int, heads: int, dim_head: int, context_dim: int | None) -> None:
        super().__init__()
        self.attn1 = CrossAttention(dim, None, heads, dim_head)
        self.ff = FeedForward(dim)
        self.attn2 = CrossAttention(dim, context_dim, heads, dim_head)
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.norm3 = nn.LayerNorm(dim)

    def forward(self, x: Tensor, context: Tensor | None = None) -> Tensor:
        x = x + self.attn1(self.norm1(x))
        x = x + self.attn2(self.norm2(x), context)
        return x + self.ff(self.norm3(x))


class SpatialTransformer(nn.Module):
    """Transformer over the H*W positions of a feature map, with a residual around it.

    ``proj_in`` / ``proj_out`` are Linear layers on tokens (SD 2.x, ``use_linear``) or 1x1 convs on
    the map (SD 1.x).  The input GroupNorm uses eps 1e-6.

    Args:
        channels: feature channels.
        heads: attention heads.
        dim_head: channels per head.
        depth: transformer blocks.
        context_dim: channels of the cross-attention context.
        use_linear: Linear projections instead of 1x1 convs.

    Shape:
        x (B, channels, H, W), context (B, M, context_dim) -> (B, channels, H, W).
    """

    def __init__(
        self, channels: int, heads: int, dim_head: int, depth: int, context_dim: int | None, use_linear: bool
    ) -> None:
        super().__init__()
        inner = heads * dim_head
        self.use_linear = use_linear
        self.norm = nn.GroupNorm(32, channels, eps=1e-6, affine=True)
        self.proj_in: nn.Module = nn.Linear(channels, inner) if use_linear else nn.Conv2d(channels, inner, 1)
        self.transformer_blocks = nn.ModuleList(
            [BasicTransformerBlock(inner, heads, dim_head, context_dim) for _ in range(depth)]
        )
        self.proj_out: nn.Module = nn.Linear(inner, channels) if use_linear else nn.Conv2d(inner, channels, 1)

    def forward(self, x: Tensor, context: Tensor | None = None) -> Tensor:
        b, c, h, w = x.shape
        y = self.norm(x)
        if not self.use_linear:
            y = self.proj_in(y)
        y = y.flatten(2).transpose(1, 2)  # (B, HW, C)
        if self.use_linear:
            y = self.proj_in(y)
        for block in self.transformer_blocks:
            y = block(y, context)
        if self.use_linear:
            y = self.proj_out(y)
        y = y.transpose(1, 2).reshape(b, -1, h, w)
        if not self.use_linear:
            y = self.proj_out(y)
        return x + y


class Upsample(nn.Module):
    """Nearest-neighbour x2 upsampling followed by a 3x3 conv (``conv``).

    Shape:
        (B, C, H, W) -> (B, C, 2H, 2W), or to an explicit ``size``.
    """

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: Tensor, size: tuple[int, int] | None = None) -> Tensor:
        if size is None:
            x = F.interpolate(x, scale_factor=2.0, mode="nearest")
        else:
            x = F.interpolate(x, size=size, mode="nearest")
        return self.conv(x)


# ---------------------------------------------------------------------------- UNet
@dataclass(frozen=True)
class UNetConfig:
    """Architecture of :class:`StableSRUNet` (names of the ldm config; defaults: SD 2.1).

    ``num_head_channels`` / ``num_heads`` are not recorded in the weights: SD 2.x uses 64 channels per
    head (``num_heads=-1``), SD 1.x 8 heads (``num_head_channels=-1``).
    """

    in_channels: int = 4
    out_channels: int = 4
    model_channels: int = 320
    channel_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    attention_resolutions: tuple[int, ...] = (4, 2, 1)
    num_head_channels: int = SD2_HEAD_CHANNELS
    num_heads: int = -1
    transformer_depth: int = 1
    context_dim: int | None = 1024
    use_linear_in_transformer: bool = True
    time_embed_dim: int = 0  # 0: 4 * model_channels

    @property
    def emb_channels(self) -> int:
        return self.time_embed_dim or 4 * self.model_channels

    def heads_for(self, channels: int) -> tuple[int, int]:
        """``(heads, dim_head)`` of a transformer at ``channels`` width."""
        if self.num_head_channels > 0:
            if channels % self.num_head_channels:
                raise UnsupportedModelError(f"width {channels} is not a multiple of {self.num_head_channels} head channels")
            return channels // self.num_head_channels, self.num_head_channels
        if self.num_heads < 1 or channels % self.num_heads:
            raise UnsupportedModelError(f"width {channels} cannot be split into {self.num_heads} heads")
        return self.num_heads, channels // self.num_heads

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["channel_mult"] = list(self.channel_mult)
        d["attention_resolutions"] = list(self.attention_resolutions)
        return d


class TimestepSequential(nn.ModuleList):
    """One UNet block: applies its layers in order, giving ResBlocks the embedding (and SFT condition)
    and transformers the text context."""

    def forward(  # type: ignore[override]
        self,
        x: Tensor,
        emb: Tensor,
        context: Tensor | None,
        sft_layer: nn.Module | None = None,
        struct_cond: Mapping[Any, Tensor] | None = None,
        out_size: tuple[int, int] | None = None,
    ) -> Tensor:
        for layer in self:
            if isinstance(layer, TimestepResBlock):
                x = _run_resblock(layer, x, emb, sft_layer, struct_cond)
            elif isinstance(layer, SpatialTransformer):
                x = layer(x, context)
            elif isinstance(layer, Upsample):
                x = layer(x, out_size)
            else:
                x = layer(x)
        return x


def _run_resblock(
    block: TimestepResBlock, x: Tensor, emb: Tensor, sft_layer: nn.Module | None, cond: Mapping[Any, Tensor] | None
) -> Tensor:
    if sft_layer is None or cond is None:
        return block(x, emb)
    return resblock_forward_with_sft(block, x, emb, sft_layer, cond)


class StableSRUNet(nn.Module):
    """The SD 2.x / 1.x denoising UNet, optionally SFT-modulated by StableSR's structure condition.

    Args:
        config: the architecture (see :class:`UNetConfig`).

    Spatial sizes need not be multiples of 8: each Upsample restores the exact size of the matching
    skip connection.
    """

    def __init__(self, config: UNetConfig | None = None) -> None:
        super().__init__()
        cfg = config or UNetConfig()
        self.config = cfg
        mc, emb_ch = cfg.model_channels, cfg.emb_channels
        self.time_embed = nn.Sequential(nn.Linear(mc, emb_ch), nn.SiLU(), nn.Linear(emb_ch, emb_ch))

        def attn(ch: int) -> SpatialTransformer:
            heads, dim_head = cfg.heads_for(ch)
            return SpatialTransformer(
                ch, heads, dim_head, cfg.transformer_depth, cfg.context_dim, cfg.use_linear_in_transformer
            )

        inputs: list[nn.Module] = [TimestepSequential([nn.Conv2d(cfg.in_channels, mc, 3, padding=1)])]
        skip_ch = [mc]
        ch, ds = mc, 1
        for level, mult in enumerate(cfg.channel_mult):
            for _ in range(cfg.num_res_blocks):
                layers: list[nn.Module] = [TimestepResBlock(ch, emb_ch, mult * mc)]
                ch = mult * mc
                if ds in cfg.attention_resolutions:
                    layers.append(attn(ch))
                inputs.append(TimestepSequential(layers))
                skip_ch.append(ch)
            if level != len(cfg.channel_mult) - 1:
                inputs.append(TimestepSequential([Downsample(ch)]))
                skip_ch.append(ch)
                ds *= 2
        self.input_blocks = nn.ModuleList(inputs)
        self.middle_block = TimestepSequential([TimestepResBlock(ch, emb_ch, ch), attn(ch), TimestepResBlock(ch, emb_ch, ch)])
        outputs: list[nn.Module] = []
        for level, mult in reversed(list(enumerate(cfg.channel_mult))):
            for i in range(cfg.num_res_blocks + 1):
                layers = [TimestepResBlock(ch + skip_ch.pop(), emb_ch, mc * mult)]
                ch = mc * mult
                if ds in cfg.attention_resolutions:
                    layers.append(attn(ch))
                if level and i == cfg.num_res_blocks:
                    layers.append(Upsample(ch))
                    ds //= 2
                outputs.append(TimestepSequential(layers))
        self.output_blocks = nn.ModuleList(outputs)
        self.out = nn.Sequential(GroupNorm32(ch), nn.SiLU(), nn.Conv2d(mc, cfg.out_channels, 3, padding=1))

    @property
    def dtype(self) -> torch.dtype:
        return self.time_embed[0].weight.dtype

    def resblock_paths(self) -> list[str]:
        """Paths of the ResBlocks (the SFT sites; 22 in SD 2.1), e.g. ``input_blocks.1.0``, ``middle_block.0``."""
        paths = [f"input_blocks.{i}.0" for i, b in enumerate(self.input_blocks) if isinstance(b[0], TimestepResBlock)]
        paths += ["middle_block.0", "middle_block.2"]
        paths += [f"output_blocks.{i}.0" for i in range(len(self.output_blocks))]
        return paths

    def forward(
        self,
        x: Tensor,
        t: Tensor,
        context: Tensor | None = None,
        struct_cond: Mapping[Any, Tensor] | None = None,
        sft: SFTLayers | None = None,
    ) -> Tensor:
        """Predict the noise (or v) of ``x`` at timestep ``t``.

        Args:
            x: (B, in_channels, H, W) noisy latent.
            t: (B,) or scalar original timesteps 0..999 (int or float).
            context: (B or 1, M, context_dim) text embedding (SD 2.x: OpenCLIP penultimate layer).
            struct_cond: the time-aware encoder's condition dict for this exact latent crop.
            sft: StableSR's SFT layers (``sft.py``); with ``struct_cond`` every ResBlock that has an SFT
                layer is modulated.

        Returns:
            (B, out_channels, H, W) in the dtype of ``x``.
        """
        if x.ndim != 4 or x.shape[1] != self.config.in_channels:
            raise InvalidInputError(f"UNet expects (B, {self.config.in_channels}, H, W), got {tuple(x.shape)}")
        b = x.shape[0]
        p = self.time_embed[0].weight
        t = torch.as_tensor(t, device=p.device).reshape(-1)
        if t.numel() == 1 and b != 1:
            t = t.expand(b)
        if t.numel() != b:
            raise InvalidInputError(f"UNet got {t.numel()} timesteps for a batch of {b}")
        emb = self.time_embed(timestep_embedding(t, self.config.model_channels).to(p.dtype))
        if context is not None:
            context = context.to(device=p.device, dtype=p.dtype)
            if context.shape[0] == 1 and b != 1:
                context = context.expand(b, -1, -1)
        use_sft = sft is not None and struct_cond is not None

        def layer_for(path: str) -> nn.Module | None:
            # SFT layers are addressed by ResBlock path ("input_blocks.1.0", "middle_block.0", ...).
            return sft.get(path) if sft is not None and use_sft else None

        h = x.to(device=p.device, dtype=p.dtype)
        skips: list[Tensor] = []
        for i, block in enumerate(self.input_blocks):
            h = block(h, emb, context, layer_for(f"input_blocks.{i}.0"), struct_cond)
            skips.append(h)
        mid = self.middle_block
        h = _run_resblock(mid[0], h, emb, layer_for("middle_block.0"), struct_cond)
        h = mid[1](h, context)
        h = _run_resblock(mid[2], h, emb, layer_for("middle_block.2"), struct_cond)
        for i, block in enumerate(self.output_blocks):
            h = torch.cat([h, skips.pop()], dim=1)
            nxt = tuple(skips[-1].shape[-2:]) if skips else None
            h = block(h, emb, context, layer_for(f"output_blocks.{i}.0"), struct_cond, nxt)
        return self.out(h).to(x.dtype)


# ---------------------------------------------------------------------------- loading
def unet_state_dict(state_dict: StateDict, prefix: str = UNET_PREFIX) -> dict[str, Tensor]:
    """The UNet's own keys: ``prefix`` stripped (when present), SFT (``.spade.``) keys dropped."""
    has_prefix = any(k.startswith(prefix) for k in state_dict)
    out: dict[str, Tensor] = {}
    for k, v in state_dict.items():
        if has_prefix:
            if not k.startswith(prefix):
                continue
            k = k[len(prefix) :]
        if ".spade." in k:
            continue
        out[k] = v
    return out


def infer_unet_config(
    state_dict: StateDict, num_head_channels: int | None = None, num_heads: int | None = None
) -> UNetConfig:
    """UNet architecture from tensor shapes (keys without the ``model.diffusion_model.`` prefix).

    Args:
        state_dict: the UNet keys (see :func:`unet_state_dict`).
        num_head_channels, num_heads: attention split, not stored in the weights.  Default: 8 heads
            for a 768-wide context (SD 1.x), otherwise 64 channels per head (SD 2.x).

    Raises:
        UnsupportedModelError: keys that do not form an ldm UNet.
    """
    for key in ("time_embed.0.weight", "input_blocks.0.0.weight", "out.2.weight"):
        if key not in state_dict:
            raise UnsupportedModelError(f"SD UNet: missing key {key!r}")
    w0 = state_dict["input_blocks.0.0.weight"]
    mc, in_ch = int(w0.shape[0]), int(w0.shape[1])
    te = state_dict["time_embed.0.weight"]
    if int(te.shape[1]) != mc:
        raise UnsupportedModelError(f"SD UNet: time_embed.0 takes {int(te.shape[1])} inputs, expected {mc}")
    levels: list[list[tuple[int, bool]]] = [[]]
    i = 1
    while True:
        p = f"input_blocks.{i}."
        if p + "0.op.weight" in state_dict:
            levels.append([])
        elif p + "0.in_layers.2.weight" in state_dict:
            levels[-1].append((int(state_dict[p + "0.in_layers.2.weight"].shape[0]), p + "1.proj_in.weight" in state_dict))
        elif any(k.startswith(p) for k in state_dict):
            raise UnsupportedModelError(f"SD UNet: input_blocks.{i} is neither a ResBlock nor a Downsample")
        else:
            break
        i += 1
    counts = {len(lv) for lv in levels}
    if len(counts) != 1 or 0 in counts:
        raise UnsupportedModelError(f"SD UNet: levels have {[len(lv) for lv in levels]} ResBlocks, expected equal counts")
    mult: list[int] = []
    attn_res: list[int] = []
    for li, lv in enumerate(levels):
        chans, attn = {c for c, _ in lv}, {a for _, a in lv}
        if len(chans) != 1 or len(attn) != 1 or next(iter(chans)) % mc:
            raise UnsupportedModelError(f"SD UNet: level {li} has widths {sorted(chans)} / attention {sorted(attn)}")
        mult.append(next(iter(chans)) // mc)
        if next(iter(attn)):
            attn_res.append(2**li)
    tf = "middle_block.1."
    if tf + "proj_in.weight" not in state_dict:
        raise UnsupportedModelError("SD UNet: middle_block.1 is not a SpatialTransformer")
    depth = 0
    while f"{tf}transformer_blocks.{depth}.norm1.weight" in state_dict:
        depth += 1
    ctx = state_dict.get(tf + "transformer_blocks.0.attn2.to_k.weight")
    context_dim = None if ctx is None else int(ctx.shape[1])
    use_linear = state_dict[tf + "proj_in.weight"].ndim == 2
    if num_head_channels is None and num_heads is None:
        if context_dim == 768:
            num_heads = SD1_NUM_HEADS
        else:
            num_head_channels = SD2_HEAD_CHANNELS
    return UNetConfig(
        in_channels=in_ch,
        out_channels=int(state_dict["out.2.weight"].shape[0]),
        model_channels=mc,
        channel_mult=tuple(mult),
        num_res_blocks=counts.pop(),
        attention_resolutions=tuple(sorted(attn_res, reverse=True)),
        num_head_channels=-1 if num_head_channels is None else num_head_channels,
        num_heads=-1 if num_heads is None else num_heads,
        transformer_depth=depth,
        context_dim=context_dim,
        use_linear_in_transformer=use_linear,
        time_embed_dim=0 if int(te.shape[0]) == 4 * mc else int(te.shape[0]),
    )


def load_unet(
    state_dict: StateDict,
    prefix: str = UNET_PREFIX,
    num_head_channels: int | None = None,
    num_heads: int | None = None,
) -> StableSRUNet:
    """Build the UNet from a checkpoint's state dict and load it strictly.

    Args:
        state_dict: full StableSR / SD checkpoint dict (``model.diffusion_model.*``; ``.spade.`` and
            other prefixes ignored) or the bare UNet keys.
        prefix: UNet key prefix.
        num_head_channels, num_heads: see :func:`infer_unet_config`.
    """
    sd = unet_state_dict(state_dict, prefix)
    model = StableSRUNet(infer_unet_config(sd, num_head_channels, num_heads))
    missing, unexpected = model.load_state_dict(sd, strict=False)
    if missing or unexpected:
        raise UnsupportedModelError(
            f"SD UNet: {len(missing)} missing keys (e.g. {missing[:3]}), {len(unexpected)} unexpected (e.g. {unexpected[:3]})"
        )
    return model.eval()
