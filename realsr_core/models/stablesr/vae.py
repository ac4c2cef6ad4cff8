"""The Stable Diffusion kl-f8 autoencoder (LDM ``AutoencoderKL``), written from its published description.

Layout (key names as in the released ``first_stage_model`` / VAE files)::

    encoder.conv_in                               3x3, in_channels -> ch
    encoder.down.{i}.block.{j}                    ResnetBlock (norm1, conv1, norm2, conv2[, nin_shortcut])
    encoder.down.{i}.attn.{j}                     AttnBlock (norm, q, k, v, proj_out), only at attention levels
    encoder.down.{i}.downsample.conv              stride-2 3x3 conv after a (0, 1, 0, 1) zero pad; not at the last level
    encoder.mid.{block_1, attn_1, block_2}
    encoder.norm_out, encoder.conv_out            GroupNorm, swish, 3x3 -> 2 * z_channels (mean and log-variance)
    quant_conv                                    1x1, 2 * z -> 2 * embed_dim
    post_quant_conv                               1x1, embed_dim -> z
    decoder.conv_in, decoder.mid.*                3x3 z -> ch * ch_mult[-1], then the mid blocks
    decoder.up.{i}.block.{j}                      num_res_blocks + 1 ResnetBlocks per level (levels stored by index,
    decoder.up.{i}.upsample.conv                  run from the deepest); nearest x2 then 3x3, not at level 0
    decoder.norm_out, decoder.conv_out            GroupNorm, swish, 3x3 -> out_channels

Every GroupNorm has 32 groups and eps 1e-6; the activation is swish (SiLU).  The configuration (``ch``,
``ch_mult``, ``num_res_blocks``, attention levels, ``z_channels``, ``embed_dim``) is inferred from tensor
shapes by :func:`infer_vae_config`.

For StableSR's CFW decoder the encoder can also return the output of encoder levels 1 and 2 (after their
res blocks, before their downsample): (B, ch*ch_mult[1], H/2, W/2) and (B, ch*ch_mult[2], H/4, W/4).
The CFW decoder itself is in :mod:`.cfw`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch.nn.functional as F
from torch import Tensor, nn

from ...descriptor import count_indexed as _count
from ...descriptor import shape_of
from ...errors import InvalidInputError, UnsupportedModelError

__all__ = [
    "SD_LATENT_SCALE",
    "VAE_PREFIXES",
    "AttnBlock",
    "AutoencoderKL",
    "Downsample",
    "ResnetBlock",
    "Upsample",
    "VAEDecoder",
    "VAEEncoder",
    "check_image",
    "extract_vae_state_dict",
    "infer_vae_config",
    "normalize",
    "vae_prefix",
]

# SD 1.x / 2.x latent scale: the diffusion model works on ``scale * posterior sample``.
SD_LATENT_SCALE: float = 0.18215
# Containers a VAE's keys are found under: bare (a VAE file, the CFW ckpt) or a full SD/StableSR ckpt.
VAE_PREFIXES: tuple[str, ...] = ("", "first_stage_model.", "vae.")
_VAE_ROOTS: tuple[str, ...] = ("encoder.", "decoder.", "quant_conv.", "post_quant_conv.")
_GN_GROUPS = 32
_GN_EPS = 1e-6
_DETECT_SUFFIXES: tuple[str, ...] = (
    "encoder.conv_in.weight",
    "encoder.down.0.block.0.conv1.weight",
    "encoder.conv_out.weight",
    "decoder.conv_in.weight",
    "decoder.up.0.block.0.conv1.weight",
    "decoder.conv_out.weight",
    "quant_conv.weight",
    "post_quant_conv.weight",
)


def normalize(channels: int) -> nn.GroupNorm:
    """The LDM ``Normalize``: GroupNorm(32 groups, eps 1e-6, affine)."""
    return nn.GroupNorm(_GN_GROUPS, channels, eps=_GN_EPS, affine=True)


class ResnetBlock(nn.Module):
    """Pre-activation residual block: (GroupNorm, swish, 3x3 conv) twice, plus a shortcut.

    Args:
        in_channels: input channels.
        out_channels: output channels (default ``in_channels``).
        shortcut: name of the projection used when the channel count changes: ``"nin_shortcut"`` (1x1, the
            SD VAE), ``"conv_shortcut"`` (3x3, LDM's ``conv_shortcut=True``) or ``"conv_out"`` (1x1, the
            CodeFormer-style ResBlock of the CFW fusion layers).  The attribute is named after it so the
            state-dict keys match.

    Shape:
        (B, in_channels, H, W) -> (B, out_channels, H, W), any value range.
    """

    def __init__(self, in_channels: int, out_channels: int | None = None, shortcut: str = "nin_shortcut") -> None:
        super().__init__()
        out_channels = in_channels if out_channels is None else out_channels
        if shortcut not in ("nin_shortcut", "conv_shortcut", "conv_out"):
            raise ValueError(f"unknown shortcut kind {shortcut!r}")
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.norm1 = normalize(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, 1, 1)
        self.norm2 = normalize(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, 1, 1)
        self.shortcut_name: str | None = None
        if in_channels != out_channels:
            k = 3 if shortcut == "conv_shortcut" else 1
            setattr(self, shortcut, nn.Conv2d(in_channels, out_channels, k, 1, k // 2))
            self.shortcut_name = shortcut

    def forward(self, x: Tensor) -> Tensor:
        # GroupNorm returns a fresh tensor, so the in-place swish never touches x.
        h = self.conv1(F.silu(self.norm1(x), inplace=True))
        h = self.conv2(F.silu(self.norm2(h), inplace=True))
        skip = x if self.shortcut_name is None else getattr(self, self.shortcut_name)(x)
        return h.add_(skip)


class AttnBlock(nn.Module):
    """Single-head spatial self-attention with 1x1-conv projections (``q``, ``k``, ``v``, ``proj_out``).

    Every position attends to every other one, scaled by ``channels ** -0.5``; the result is added to the
    input.  Runs through ``scaled_dot_product_attention`` so memory-efficient kernels are used where the
    backend has them.

    Shape:
        (B, C, H, W) -> (B, C, H, W).
    """

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.norm = normalize(channels)
        self.q = nn.Conv2d(channels, channels, 1)
        self.k = nn.Conv2d(channels, channels, 1)
        self.v = nn.Conv2d(channels, channels, 1)
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(self, x: Tensor) -> Tensor:
        b, c, h, w = x.shape
        n = self.norm(x)
        # (B, C, H, W) -> (B, 1, HW, C): one head whose width is the channel count.
        q, k, v = (p(n).reshape(b, 1, c, h * w).transpose(-1, -2) for p in (self.q, self.k, self.v))
        a = F.scaled_dot_product_attention(q, k, v)
        a = a.transpose(-1, -2).reshape(b, c, h, w)
        return self.proj_out(a).add_(x)


class Downsample(nn.Module):
    """Stride-2 3x3 conv after zero-padding one row/column at the bottom/right (LDM's asymmetric pad).

    Shape:
        (B, C, H, W) -> (B, C, floor(H/2), floor(W/2)) for H, W >= 2.
    """

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, 2, 0)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    """Nearest-neighbour x2 then a 3x3 conv.

    Shape:
        (B, C, H, W) -> (B, C, 2H, 2W).
    """

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, 1, 1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class _Level(nn.Module):
    """One resolution level: ``block`` (res blocks), ``attn`` (empty when unused) and an optional resampler."""

    def __init__(self) -> None:
        super().__init__()
        self.block = nn.ModuleList()
        self.attn = nn.ModuleList()

    def run_blocks(self, h: Tensor) -> Tensor:
        for i, blk in enumerate(self.block):
            h = blk(h)
            if len(self.attn) > 0:
                h = self.attn[i](h)
        return h


def _mid(channels: int, attention: bool, shortcut: str) -> nn.Module:
    mid = nn.Module()
    mid.block_1 = ResnetBlock(channels, channels, shortcut)
    mid.attn_1 = AttnBlock(channels) if attention else nn.Identity()
    mid.block_2 = ResnetBlock(channels, channels, shortcut)
    return mid


class VAEEncoder(nn.Module):
    """The kl-f8 encoder: image -> latent moments (and, on request, the CFW features).

    Args:
        in_channels: image channels.
        ch: base channel count.
        ch_mult: channel multiplier per level; ``len(ch_mult) - 1`` downsamples.
        num_res_blocks: res blocks per level.
        z_channels: latent channels.
        double_z: output mean and log-variance (2 * z_channels) rather than z_channels.
        attn_levels: levels with self-attention after each res block (none in SD / the CFW VAE).
        mid_attn: whether the middle has its attention block.
        shortcut: res-block projection kind (see :class:`ResnetBlock`).
        feature_levels: levels whose output (after their res blocks, before their downsample) is returned
            by ``forward(..., return_features=True)``; (1, 2) for StableSR's CFW.

    Shape:
        (B, in_channels, H, W) -> (B, 2 * z_channels, H / 2^(L-1), W / 2^(L-1)) with L levels; H and W
        should be multiples of 2^(L-1) (odd sizes are floored at each downsample).
    """

    def __init__(
        self,
        *,
        in_channels: int = 3,
        ch: int = 128,
        ch_mult: Sequence[int] = (1, 2, 4, 4),
        num_res_blocks: int = 2,
        z_channels: int = 4,
        double_z: bool = True,
        attn_levels: Sequence[int] = (),
        mid_attn: bool = True,
        shortcut: str = "nin_shortcut",
        feature_levels: Sequence[int] = (1, 2),
    ) -> None:
        super().__init__()
        self.num_levels = len(ch_mult)
        self.feature_levels = tuple(int(i) for i in feature_levels)
        self.conv_in = nn.Conv2d(in_channels, ch, 3, 1, 1)
        self.down = nn.ModuleList()
        block_in = ch
        for i, mult in enumerate(ch_mult):
            level = _Level()
            block_out = ch * mult
            for _ in range(num_res_blocks):
                level.block.append(ResnetBlock(block_in, block_out, shortcut))
                block_in = block_out
                if i in attn_levels:
                    level.attn.append(AttnBlock(block_in))
            if i != self.num_levels - 1:
                level.downsample = Downsample(block_in)
            self.down.append(level)
        self.mid = _mid(block_in, mid_attn, shortcut)
        self.norm_out = normalize(block_in)
        self.conv_out = nn.Conv2d(block_in, 2 * z_channels if double_z else z_channels, 3, 1, 1)
        self.feature_channels = tuple(ch * ch_mult[i] for i in self.feature_levels)

    def forward(self, x: Tensor, return_features: bool = False) -> Tensor | tuple[Tensor, list[Tensor]]:
        """Encode an image.

        Args:
            x: (B, in_channels, H, W), [-1, 1] for SD VAEs.
            return_features: also return the ``feature_levels`` outputs.

        Returns:
            the moments (B, 2*z, H/8, W/8) for the kl-f8 layout; with ``return_features`` a tuple
            ``(moments, [features of each feature level])``.
        """
        feats: list[Tensor] = []
        h = self.conv_in(x)
        for i, level in enumerate(self.down):
            h = level.run_blocks(h)
            if return_features and i in self.feature_levels:
                feats.append(h)
            if i != self.num_levels - 1:
                h = level.downsample(h)
        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(h)))
        h = self.conv_out(F.silu(self.norm_out(h), inplace=True))
        return (h, feats) if return_features else h

    def encode_features(self, x: Tensor) -> list[Tensor]:
        """Only the feature-level outputs (stops after the deepest feature level, skipping the rest).

        Args:
            x: (B, in_channels, H, W).

        Returns:
            one (B, C_l, H / 2^l, W / 2^l) tensor per feature level, in ``feature_levels`` order.
        """
        if not self.feature_levels:
            return []
        last = max(self.feature_levels)
        feats: list[Tensor] = []
        h = self.conv_in(x)
        for i, level in enumerate(self.down):
            h = level.run_blocks(h)
            if i in self.feature_levels:
                feats.append(h)
            if i == last:
                break
            h = level.downsample(h)
        return feats


# A hook the decoder calls at each level after its res blocks, before its upsample: (level, h) -> h.
LevelHook = Callable[[int, Tensor], Tensor]


class VAEDecoder(nn.Module):
    """The kl-f8 decoder: latent -> image.

    Args:
        out_channels: image channels.
        ch, ch_mult, num_res_blocks, attn_levels, mid_attn, shortcut: as in :class:`VAEEncoder`; each level
            has ``num_res_blocks + 1`` res blocks.
        z_channels: latent channels.

    Shape:
        (B, z_channels, h, w) -> (B, out_channels, h * 2^(L-1), w * 2^(L-1)), not clamped ([-1, 1] nominal).
    """

    def __init__(
        self,
        *,
        out_channels: int = 3,
        ch: int = 128,
        ch_mult: Sequence[int] = (1, 2, 4, 4),
        num_res_blocks: int = 2,
        z_channels: int = 4,
        attn_levels: Sequence[int] = (),
        mid_attn: bool = True,
        shortcut: str = "nin_shortcut",
    ) -> None:
        super().__init__()
        self.num_levels = len(ch_mult)
        self.level_channels = tuple(ch * m for m in ch_mult)
        block_in = ch * ch_mult[-1]
        self.conv_in = nn.Conv2d(z_channels, block_in, 3, 1, 1)
        self.mid = _mid(block_in, mid_attn, shortcut)
        levels: list[_Level] = []
        for i in reversed(range(self.num_levels)):
            level = _Level()
            block_out = ch * ch_mult[i]
            for _ in range(num_res_blocks + 1):
                level.block.append(ResnetBlock(block_in, block_out, shortcut))
                block_in = block_out
                if i in attn_levels:
                    level.attn.append(AttnBlock(block_in))
            if i != 0:
                level.upsample = Upsample(block_in)
            levels.append(level)
        # Stored by level index (up.0 is the full-resolution level) although they run deepest first.
        self.up = nn.ModuleList(reversed(levels))
        self.norm_out = normalize(block_in)
        self.conv_out = nn.Conv2d(block_in, out_channels, 3, 1, 1)

    def forward(self, z: Tensor) -> Tensor:
        """Decode a latent (after ``post_quant_conv``).

        Args:
            z: (B, z_channels, h, w).

        Returns:
            (B, out_channels, 8h, 8w) for the kl-f8 layout, not clamped.
        """
        return self.run(z, None)

    def run(self, z: Tensor, hook: LevelHook | None) -> Tensor:
        """Decode, calling ``hook(level, h)`` after each level's res blocks and before its upsample."""
        h = self.conv_in(z)
        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(h)))
        for i in reversed(range(self.num_levels)):
            level = self.up[i]
            h = level.run_blocks(h)
            if hook is not None:
                h = hook(i, h)
            if i != 0:
                h = level.upsample(h)
        return self.conv_out(F.silu(self.norm_out(h), inplace=True))


class AutoencoderKL(nn.Module):
    """Encoder + ``quant_conv`` and ``post_quant_conv`` + decoder, with the LDM method names.

    Args:
        config: as returned by :func:`infer_vae_config`.
        decoder: a decoder to use instead of a plain :class:`VAEDecoder` (the CFW decoder).
    """

    def __init__(self, config: Mapping[str, Any], decoder: VAEDecoder | None = None) -> None:
        super().__init__()
        common = {
            "ch": config["ch"],
            "ch_mult": tuple(config["ch_mult"]),
            "num_res_blocks": config["num_res_blocks"],
            "z_channels": config["z_channels"],
            "mid_attn": config["mid_attn"],
            "shortcut": config["shortcut"],
        }
        self.config = dict(config)
        self.encoder = VAEEncoder(
            in_channels=config["in_channels"],
            double_z=config["double_z"],
            attn_levels=tuple(config["enc_attn_levels"]),
            feature_levels=tuple(config.get("feature_levels", (1, 2))),
            **common,
        )
        z2 = 2 * config["z_channels"] if config["double_z"] else config["z_channels"]
        embed = config["embed_dim"]
        self.quant_conv = nn.Conv2d(z2, 2 * embed if config["double_z"] else embed, 1)
        self.post_quant_conv = nn.Conv2d(embed, config["z_channels"], 1)
        self.decoder = (
            decoder
            if decoder is not None
            else VAEDecoder(out_channels=config["out_channels"], attn_levels=tuple(config["dec_attn_levels"]), **common)
        )

    @property
    def downscale(self) -> int:
        """Image pixels per latent pixel (8 for kl-f8)."""
        return 2 ** (self.encoder.num_levels - 1)

    def moments(self, x: Tensor) -> Tensor:
        """``quant_conv(encoder(x))``: (B, 2*embed_dim, H/8, W/8), mean then log-variance channels."""
        out = self.encoder(x)
        assert isinstance(out, Tensor)
        return self.quant_conv(out)

    def encode(self, x: Tensor, return_features: bool = False) -> tuple[Tensor, ...]:
        """Posterior of an image.

        Args:
            x: (B, 3, H, W) in [-1, 1], H and W multiples of 8.
            return_features: also return the encoder's feature-level outputs (CFW's ``enc_fea``).

        Returns:
            ``(mean, logvar)``, each (B, embed_dim, H/8, W/8), logvar clamped to [-30, 20] as in the
            official ``DiagonalGaussianDistribution``; with ``return_features`` also the list of features,
            ``(mean, logvar, [(B, 256, H/2, W/2), (B, 512, H/4, W/4)])`` for the SD layout.
        """
        if return_features:
            h, feats = self.encoder(x, return_features=True)
        else:
            h, feats = self.encoder(x), []
        mean, logvar = self.quant_conv(h).chunk(2, dim=1)
        logvar = logvar.clamp(-30.0, 20.0)
        return (mean, logvar, feats) if return_features else (mean, logvar)

    def decode(self, z: Tensor) -> Tensor:
        """Image from a latent (``post_quant_conv`` then the decoder).

        Args:
            z: (B, embed_dim, h, w), *unscaled* (divide a diffusion latent by :data:`SD_LATENT_SCALE`).

        Returns:
            (B, 3, 8h, 8w), [-1, 1] nominal, not clamped.
        """
        return self.decoder(self.post_quant_conv(z))


# ---------------------------------------------------------------------------- state dicts


def _has(sd: Mapping[str, Any], prefix: str) -> bool:
    return all(prefix + k in sd for k in _DETECT_SUFFIXES)


def vae_prefix(state_dict: Mapping[str, Any]) -> str | None:
    """The prefix the VAE keys live under (``""``, ``"first_stage_model."`` ...), or None if there is no VAE."""
    for prefix in VAE_PREFIXES:
        if _has(state_dict, prefix):
            return prefix
    return None


def extract_vae_state_dict(state_dict: Mapping[str, Tensor]) -> tuple[dict[str, Tensor], list[str]]:
    """The VAE's tensors with their prefix removed, plus the keys left out.

    Args:
        state_dict: a VAE file, a CFW VAE (``{'state_dict': ...}`` already unwrapped) or a full SD /
            StableSR checkpoint (``first_stage_model.*``).

    Returns:
        ``(vae_sd, ignored)``: ``vae_sd`` keys start with ``encoder.``, ``decoder.``, ``quant_conv.`` or
        ``post_quant_conv.``; ``ignored`` lists every other key (``loss.*``, UNet, text encoder ...).

    Raises:
        UnsupportedModelError: no VAE keys found.
    """
    prefix = vae_prefix(state_dict)
    if prefix is None:
        missing = [k for k in _DETECT_SUFFIXES if k not in state_dict][:4]
        raise UnsupportedModelError(
            f"no Stable Diffusion (LDM-layout) VAE found: missing e.g. {missing} (also looked under "
            f"{[p for p in VAE_PREFIXES if p]}); diffusers-layout VAEs are not supported"
        )
    roots = tuple(prefix + r for r in _VAE_ROOTS)
    vae = {k[len(prefix) :]: v for k, v in state_dict.items() if k.startswith(roots)}
    ignored = [k for k in state_dict if not k.startswith(roots)]
    return vae, ignored


def infer_vae_config(sd: Mapping[str, Tensor], file_prefix: str = "") -> dict[str, Any]:
    """Constructor configuration of :class:`AutoencoderKL` from a prefix-free VAE state dict's shapes.

    ``file_prefix`` is the prefix the keys had in the file (``first_stage_model.``), for messages.

    Returns:
        dict with ``in_channels, out_channels, ch, ch_mult, num_res_blocks, z_channels, double_z, embed_dim,
        enc_attn_levels, dec_attn_levels, mid_attn, shortcut, feature_levels``.

    Raises:
        UnsupportedModelError: a layout the LDM autoencoder cannot have (inconsistent shapes).
    """
    if not _has(sd, ""):
        raise UnsupportedModelError("not an LDM-layout VAE state dict (encoder.conv_in / decoder.conv_in ... missing)")
    def shape(key: str) -> tuple[int, ...]:
        return shape_of(sd, key, "VAE", ndim=4, file_prefix=file_prefix)  # every tensor read here is a conv

    ch, in_channels = shape("encoder.conv_in.weight")[:2]
    num_levels = _count(sd, "encoder.down.{}.block.0.conv1.weight")
    num_res = _count(sd, "encoder.down.0.block.{}.conv1.weight")
    ch_mult = []
    for i in range(num_levels):
        out = shape(f"encoder.down.{i}.block.0.conv1.weight")[0]
        if out % ch:
            raise UnsupportedModelError(f"encoder level {i} has {out} channels, not a multiple of ch={ch}")
        ch_mult.append(out // ch)
    z_channels = shape("decoder.conv_in.weight")[1]
    enc_out = shape("encoder.conv_out.weight")[0]
    if enc_out not in (z_channels, 2 * z_channels):
        raise UnsupportedModelError(f"encoder.conv_out gives {enc_out} channels for a {z_channels}-channel latent")
    dec_res = _count(sd, "decoder.up.0.block.{}.conv1.weight") - 1
    if dec_res != num_res or _count(sd, "decoder.up.{}.block.0.conv1.weight") != num_levels:
        raise UnsupportedModelError(
            f"decoder layout ({dec_res + 1} blocks per level) does not mirror the encoder "
            f"({num_levels} levels, {num_res} blocks per level)"
        )
    has_nin = any(".nin_shortcut." in k for k in sd)
    has_conv_sc = any(".conv_shortcut." in k for k in sd)
    return {
        "in_channels": in_channels,
        "out_channels": shape("decoder.conv_out.weight")[0],
        "ch": ch,
        "ch_mult": ch_mult,
        "num_res_blocks": num_res,
        "z_channels": z_channels,
        "double_z": enc_out == 2 * z_channels,
        "embed_dim": shape("post_quant_conv.weight")[1],
        "enc_attn_levels": [i for i in range(num_levels) if f"encoder.down.{i}.attn.0.q.weight" in sd],
        "dec_attn_levels": [i for i in range(num_levels) if f"decoder.up.{i}.attn.0.q.weight" in sd],
        "mid_attn": "encoder.mid.attn_1.q.weight" in sd,
        "shortcut": "conv_shortcut" if has_conv_sc and not has_nin else "nin_shortcut",
        "feature_levels": [i for i in (1, 2) if i < num_levels - 1],
    }


def check_image(x: Tensor, channels: int, multiple: int, what: str = "image") -> None:
    """Raise :class:`InvalidInputError` unless ``x`` is (B, channels, H, W) with H, W multiples of ``multiple``."""
    if not isinstance(x, Tensor) or x.dim() != 4 or x.shape[1] != channels:
        shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
        raise InvalidInputError(f"{what} must be a (B, {channels}, H, W) tensor, got {shape}")
    h, w = x.shape[-2:]
    if h < multiple or w < multiple or h % multiple or w % multiple:
        raise InvalidInputError(
            f"{what} height and width must be positive multiples of {multiple}, got {h}x{w} (pad it first)"
        )
    if not x.is_floating_point():
        raise InvalidInputError(f"{what} must be a floating-point tensor, got {x.dtype}")
