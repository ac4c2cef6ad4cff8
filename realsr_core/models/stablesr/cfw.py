"""StableSR's CFW (controllable feature wrapping) VAE: the SD decoder plus fusion layers, and its loader.

The CFW decoder (paper: Wang et al., "Exploiting Diffusion Prior for Real-World Image Super-Resolution",
section "Controllable Feature Wrapping") is the SD kl-f8 decoder with one fusion layer at decoder levels 2
(512 ch, H/4) and 1 (256 ch, H/2).  Each runs after that level's res blocks and before its upsample::

    h <- h + w * F(cat(enc, h))        F = ResBlock(2C -> C) -> RRDB x2 -> ResBlock(C -> C)

where ``enc`` is the output of the same level of the VAE *encoder* run on the low-resolution input (bicubic
up-sampled to the output size), and ``w`` in [0, 1] trades realism (0: the plain SD decoder) for fidelity
(1).  ``F``'s ResBlocks are GroupNorm(32, eps 1e-6) + swish + 3x3 conv twice with a 1x1 ``conv_out``
shortcut when the channel count changes; the RRDBs are ESRGAN's (3 dense blocks, growth 32).

Files: ``vqgan_cfw_00011.ckpt`` (Lightning ``{'state_dict': ...}`` with ``encoder.*``, ``decoder.*``
including ``decoder.fusion_layer_{1,2}.*``, ``quant_conv.*``, ``post_quant_conv.*``; training ``loss.*``
keys are ignored) is architecture ``"stablesr_cfw"``.  A plain SD VAE (a VAE file with bare keys, or the
``first_stage_model.*`` part of an SD checkpoint passed as a state dict) is ``"sd_vae"``.  Both are
``purpose="Module"``: they serve the StableSR pipeline (``encode`` / ``decode``; window by window through
:func:`realsr_core.tiling.tiled_vae_encode` / :func:`~realsr_core.tiling.tiled_vae_decode`), not the
image-to-image ``forward``.
"""

from __future__ import annotations

import numbers
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from ...descriptor import Architecture, ModelDescriptor, StateDict, check_weights, shape_of
from ...errors import InvalidInputError, UnsupportedModelError
from ..blocks.rrdb import RRDB
from .vae import (
    AutoencoderKL,
    ResnetBlock,
    VAEDecoder,
    check_image,
    extract_vae_state_dict,
    infer_vae_config,
    vae_prefix,
)

__all__ = [
    "ARCHITECTURES",
    "CFW_ARCHITECTURE",
    "DEFAULT_FIDELITY",
    "SD_VAE_ARCHITECTURE",
    "CFWAutoencoder",
    "CFWDecoder",
    "FusionBlock",
    "VAEDescriptor",
    "build_vae",
    "check_fidelity",
    "detect_cfw",
    "detect_sd_vae",
    "infer_cfw_config",
    "load_cfw",
    "load_sd_vae",
    "load_vae",
]

# The official scripts' and the paper's default fidelity weight (``--dec_w 0.5``).
DEFAULT_FIDELITY: float = 0.5
_FUSION_KEY = "decoder.fusion_layer_{}.encode_enc_1.conv1.weight"
# Peak float32 activation bytes of a whole-image decode per *latent* pixel (the decode's input, as
# ``ModelDescriptor.bytes_per_px`` is defined), measured on CPU with the 128-channel VAE at 256x256 px: about
# 4.5 KB per output pixel for the plain decoder and 5.6 KB with the CFW fusion (the encoder features, 384 B
# per output pixel, not included; an encode peaks at ~3.1 KB per image pixel).  Rounded up, x 64 px per latent px.
_DECODE_BYTES_PER_LATENT_PX = {False: 5120.0 * 64, True: 6144.0 * 64}


def check_fidelity(w: float) -> float:
    """Validate the CFW weight: a real number in [0, 1]."""
    if isinstance(w, bool) or not isinstance(w, numbers.Real) or not 0.0 <= float(w) <= 1.0:
        raise InvalidInputError(f"CFW fidelity weight w must be a number in [0, 1], got {w!r}")
    return float(w)


class FusionBlock(nn.Module):
    """One CFW fusion layer: ``dec + w * F(cat(enc, dec))`` (key names ``encode_enc_{1,2,3}``).

    Args:
        channels: C, the channels of both the encoder and the decoder feature.
        num_rrdb: RRDBs in ``encode_enc_2`` (2 in StableSR).
        grow_channels: RRDB growth channels (32).

    Shape:
        enc, dec: (B, C, H, W) -> (B, C, H, W).
    """

    def __init__(self, channels: int, num_rrdb: int = 2, grow_channels: int = 32) -> None:
        super().__init__()
        self.encode_enc_1 = ResnetBlock(2 * channels, channels, shortcut="conv_out")
        self.encode_enc_2 = nn.Sequential(*(RRDB(channels, grow_channels) for _ in range(num_rrdb)))
        self.encode_enc_3 = ResnetBlock(channels, channels, shortcut="conv_out")

    def residual(self, enc: Tensor, dec: Tensor) -> Tensor:
        """``F(cat(enc, dec))``, the correction before weighting."""
        return self.encode_enc_3(self.encode_enc_2(self.encode_enc_1(torch.cat([enc, dec], dim=1))))

    def forward(self, enc: Tensor, dec: Tensor, w: float) -> Tensor:
        return dec + w * self.residual(enc, dec)


class CFWDecoder(VAEDecoder):
    """SD decoder with CFW fusion layers ``fusion_layer_{l}`` at the given decoder levels.

    Args:
        fusion_levels: decoder levels with a fusion layer ((1, 2) in StableSR); the fusion at level ``l``
            takes the encoder's level-``l`` feature.
        num_rrdb, grow_channels: fusion-layer RRDB layout.
        **kwargs: :class:`VAEDecoder` arguments.
    """

    def __init__(
        self, *, fusion_levels: Sequence[int] = (1, 2), num_rrdb: int = 2, grow_channels: int = 32, **kwargs: Any
    ) -> None:
        super().__init__(**kwargs)
        self.fusion_levels = tuple(sorted(int(lv) for lv in fusion_levels))
        for lv in self.fusion_levels:
            if not 0 <= lv < self.num_levels:
                raise ValueError(f"fusion level {lv} outside the decoder's {self.num_levels} levels")
            setattr(self, f"fusion_layer_{lv}", FusionBlock(self.level_channels[lv], num_rrdb, grow_channels))

    def fusion(self, level: int) -> FusionBlock:
        layer = getattr(self, f"fusion_layer_{level}")
        assert isinstance(layer, FusionBlock)
        return layer

    def forward(self, z: Tensor, features: Sequence[Tensor] | None = None, w: float = DEFAULT_FIDELITY) -> Tensor:
        """Decode with feature fusion.

        Args:
            z: (B, z_channels, h, w), after ``post_quant_conv``.
            features: one tensor per fusion level in increasing level order, level ``l`` at
                (B, C_l, 8h / 2^l, 8w / 2^l) (StableSR: [(B, 256, 4h, 4w), (B, 512, 2h, 2w)]).  Not needed
                when ``w == 0``.
            w: fidelity weight in [0, 1].  0 is exactly the plain SD decoder; the fusion branch is then not
                evaluated at all (saves its memory and time).

        Returns:
            (B, out_channels, 8h, 8w), not clamped.
        """
        w = check_fidelity(w)
        if w == 0.0:
            return self.run(z, None)
        feats = self._check_features(z, features)
        by_level = dict(zip(self.fusion_levels, feats, strict=True))

        def fuse(level: int, h: Tensor) -> Tensor:
            if level not in by_level:
                return h
            enc = by_level[level].to(device=h.device, dtype=h.dtype)
            return self.fusion(level)(enc, h, w)

        return self.run(z, fuse)

    def _check_features(self, z: Tensor, features: Sequence[Tensor] | None) -> list[Tensor]:
        if features is None or len(features) != len(self.fusion_levels):
            got = "None" if features is None else f"{len(features)} tensors"
            raise InvalidInputError(
                f"CFW decoding with w > 0 needs {len(self.fusion_levels)} encoder features (levels "
                f"{list(self.fusion_levels)}), got {got}; pass w=0 to decode without them"
            )
        up = 2 ** (self.num_levels - 1)
        out: list[Tensor] = []
        for lv, f in zip(self.fusion_levels, features, strict=True):
            size = (z.shape[-2] * up // 2**lv, z.shape[-1] * up // 2**lv)
            want = (z.shape[0], self.level_channels[lv], *size)
            if not isinstance(f, Tensor) or tuple(f.shape) != want:
                got = tuple(f.shape) if isinstance(f, Tensor) else type(f).__name__
                raise InvalidInputError(
                    f"CFW feature for level {lv} must have shape {want} for latent {tuple(z.shape)}, got {got}"
                )
            out.append(f)
        return out


class CFWAutoencoder(AutoencoderKL):
    """``AutoencoderKL`` whose ``decode`` takes the encoder features and the fidelity weight."""

    decoder: CFWDecoder

    def decode(self, z: Tensor, features: Sequence[Tensor] | None = None, w: float = DEFAULT_FIDELITY) -> Tensor:
        """Image from an unscaled latent: ``CFWDecoder(post_quant_conv(z), features, w)``.

        Args:
            z: (B, embed_dim, h, w), unscaled (diffusion latent / 0.18215).
            features: the LR image's encoder features, ``encode(lr, return_features=True)[2]``.
            w: fidelity weight in [0, 1] (0: plain SD decoder, features unused).

        Returns:
            (B, 3, 8h, 8w), [-1, 1] nominal, not clamped.
        """
        return self.decoder(self.post_quant_conv(z), features, w)


# ---------------------------------------------------------------------------- configuration and building


def infer_cfw_config(vae_sd: Mapping[str, Tensor], file_prefix: str = "") -> dict[str, Any]:
    """:func:`infer_vae_config` plus the fusion layout (``fusion_levels``, ``num_rrdb``, ``grow_channels``).

    ``file_prefix`` is the prefix the keys had in the file (``first_stage_model.``), for messages.

    ``fusion_levels`` is empty for a plain SD VAE.

    Raises:
        UnsupportedModelError: fusion tensors that do not fit the decoder's channels.
    """
    config = infer_vae_config(vae_sd, file_prefix)
    levels = len(config["ch_mult"])
    fusion = [lv for lv in range(levels) if _FUSION_KEY.format(lv) in vae_sd]
    config["fusion_levels"] = fusion
    if not fusion:
        return config
    first = f"decoder.fusion_layer_{fusion[0]}.encode_enc_2.{{}}.rdb1.conv1.weight"
    num_rrdb = 0
    while first.format(num_rrdb) in vae_sd:
        num_rrdb += 1
    if num_rrdb == 0:
        raise UnsupportedModelError(f"CFW fusion layer {fusion[0]} has no RRDB blocks (encode_enc_2.0 missing)")
    config["num_rrdb"] = num_rrdb
    config["grow_channels"] = shape_of(vae_sd, first.format(0), "CFW", ndim=4, file_prefix=file_prefix)[0]
    for lv in fusion:
        c = config["ch"] * config["ch_mult"][lv]
        shape = shape_of(vae_sd, _FUSION_KEY.format(lv), "CFW", ndim=4, file_prefix=file_prefix)
        if shape[:2] != (c, 2 * c):
            raise UnsupportedModelError(
                f"CFW fusion_layer_{lv}.encode_enc_1.conv1 has shape {shape}, expected ({c}, {2 * c}, 3, 3) for "
                f"decoder level {lv}"
            )
    # The encoder returns exactly the levels the decoder fuses.
    config["feature_levels"] = fusion
    return config


def build_vae(config: Mapping[str, Any]) -> AutoencoderKL:
    """An uninitialised autoencoder for ``config`` (a CFW one when it has fusion levels)."""
    if not config.get("fusion_levels"):
        return AutoencoderKL(config)
    decoder = CFWDecoder(
        out_channels=config["out_channels"],
        ch=config["ch"],
        ch_mult=tuple(config["ch_mult"]),
        num_res_blocks=config["num_res_blocks"],
        z_channels=config["z_channels"],
        attn_levels=tuple(config["dec_attn_levels"]),
        mid_attn=config["mid_attn"],
        shortcut=config["shortcut"],
        fusion_levels=tuple(config["fusion_levels"]),
        num_rrdb=config["num_rrdb"],
        grow_channels=config["grow_channels"],
    )
    return CFWAutoencoder(config, decoder)


# ---------------------------------------------------------------------------- descriptor

class VAEDescriptor(ModelDescriptor):
    """An SD VAE (optionally with StableSR's CFW decoder) for the StableSR pipeline.

    Images are in the model's space, [-1, 1] (``2 * image01 - 1``), RGB, NCHW; latents are *unscaled*
    (multiply by :data:`~.vae.SD_LATENT_SCALE` for the diffusion model).  ``forward`` refuses to run: this is
    not an upscaler.  ``bytes_per_px`` is the float32 peak of a whole-image decode per *latent* pixel (CPU
    measurement; add the CFW features, 96 values per image pixel, when they are held on the same device).
    """

    model: AutoencoderKL

    @property
    def has_cfw(self) -> bool:
        """Whether the decoder has CFW fusion layers."""
        return isinstance(self.model.decoder, CFWDecoder)

    @property
    def downscale(self) -> int:
        """Image pixels per latent pixel (8)."""
        return self.model.downscale

    def forward(self, x: Tensor, **context: Any) -> Tensor:
        raise InvalidInputError(
            f"{self.name} is a VAE used inside the StableSR pipeline, not an image-to-image model; use its "
            "encode()/decode() methods (or the StableSR upscaler) instead of calling it on an image"
        )

    __call__ = forward

    @torch.no_grad()
    def encode(self, image: Tensor, return_features: bool = True) -> tuple[Tensor, ...]:
        """Posterior mean / log-variance (and the CFW features) of a whole image.

        Args:
            image: (B, 3, H, W) in [-1, 1], H and W multiples of 8, on the model's device and dtype.
            return_features: also return the encoder features the CFW decoder fuses.

        Returns:
            ``(mean, logvar)`` (B, 4, H/8, W/8) each, plus the feature list with ``return_features``
            ([(B, 256, H/2, W/2), (B, 512, H/4, W/4)] for StableSR's VAE; empty for a plain SD VAE).
        """
        self.check_encode(image)
        return self.model.encode(image, return_features=return_features)

    @torch.no_grad()
    def decode(self, latent: Tensor, features: Sequence[Tensor] | None = None, w: float | None = None) -> Tensor:
        """Decode a whole unscaled latent.

        Args:
            latent: (B, 4, h, w), on the model's device and dtype.
            features: the LR image's encoder features (needed for ``w > 0`` with a CFW VAE).
            w: CFW fidelity weight in [0, 1]; default :data:`DEFAULT_FIDELITY` (0.5) for a CFW VAE and 0 for a
                plain SD VAE, which accepts only 0.

        Returns:
            (B, 3, 8h, 8w) in [-1, 1] nominal, not clamped.
        """
        w = self.check_decode(latent, features, w)
        if isinstance(self.model, CFWAutoencoder):
            return self.model.decode(latent, features, w)
        return self.model.decode(latent)

    def check_encode(self, image: Tensor) -> None:
        """Refuse an image :meth:`encode` cannot take (also checked before a tiled encode starts)."""
        check_image(image, self.in_channels, self.downscale)

    def check_decode(self, latent: Tensor, features: Sequence[Tensor] | None = None, w: float | None = None) -> float:
        """Refuse what :meth:`decode` cannot take (also checked before a tiled decode starts).

        Returns:
            the fidelity weight ``w`` stands for (its default resolved).
        """
        w = self._check_w(w)
        check_image(latent, self.model.config["embed_dim"], 1, "latent")
        if w > 0.0 and isinstance(self.model, CFWAutoencoder):
            self.model.decoder._check_features(latent, features)
        return w

    def _check_w(self, w: float | None) -> float:
        if w is None:
            return DEFAULT_FIDELITY if self.has_cfw else 0.0
        w = check_fidelity(w)
        if w > 0.0 and not self.has_cfw:
            raise InvalidInputError(
                f"{self.name} has no CFW fusion layers, so the fidelity weight must be 0 (got {w}); load "
                "StableSR's vqgan_cfw_00011.ckpt for w > 0"
            )
        return w


# ---------------------------------------------------------------------------- detection and loading


def detect_cfw(state_dict: StateDict) -> bool:
    """True for a StableSR CFW VAE: LDM VAE keys plus ``decoder.fusion_layer_*`` (bare or prefixed)."""
    prefix = vae_prefix(state_dict)
    if prefix is None:
        return False
    fusion = prefix + "decoder.fusion_layer_"
    return any(k.startswith(fusion) for k in state_dict)


def detect_sd_vae(state_dict: StateDict) -> bool:
    """True for a plain SD VAE (LDM layout, bare keys or ``first_stage_model.*``) without CFW layers.

    A full diffusion checkpoint (``model.diffusion_model.*`` present) is not taken: it is not a VAE file.
    """
    if vae_prefix(state_dict) is None or detect_cfw(state_dict):
        return False
    return not any(k.startswith("model.diffusion_model.") for k in state_dict)


def load_vae(state_dict: StateDict) -> VAEDescriptor:
    """Build an SD VAE or a CFW VAE from a state dict, inferring the configuration from the shapes.

    Args:
        state_dict: the VAE's tensors, bare (``encoder.*`` ...) or under ``first_stage_model.``; other keys
            (``loss.*``, a UNet ...) are ignored and listed in ``ignored_keys``.

    Raises:
        UnsupportedModelError: no LDM-layout VAE, or tensors that do not fit the inferred layout.
        CheckpointError: weights that are NaN/inf or not floating point (:func:`check_weights`).
    """
    vae_sd, ignored = extract_vae_state_dict(state_dict)
    prefix = vae_prefix(state_dict) or ""
    config = infer_cfw_config(vae_sd, prefix)
    # Built on the meta device and then given the checkpoint's tensors: no time spent on a random init that
    # would be overwritten (seconds for the 84 M / 128 M parameter models).  Float32, like the other loaders.
    with torch.device("meta"):
        model = build_vae(config)
    vae_sd = {k: v.float() if v.is_floating_point() and v.dtype != torch.float32 else v for k, v in vae_sd.items()}
    expected = model.state_dict()
    missing = [k for k in expected if k not in vae_sd]
    unexpected = [k for k in vae_sd if k not in expected]
    if missing or unexpected:
        raise UnsupportedModelError(
            f"VAE state dict does not match the inferred layout (ch {config['ch']}, ch_mult {config['ch_mult']}, "
            f"{config['num_res_blocks']} res blocks, fusion levels {config['fusion_levels']}): "
            f"missing {missing[:5]}{'...' if len(missing) > 5 else ''}, "
            f"unexpected {unexpected[:5]}{'...' if len(unexpected) > 5 else ''}"
        )
    bad = [
        f"{k}: {tuple(vae_sd[k].shape)} != {tuple(t.shape)}" for k, t in expected.items() if vae_sd[k].shape != t.shape
    ]
    if bad:
        raise UnsupportedModelError(f"VAE tensor shapes do not fit the inferred layout: {bad[:3]}")
    what = "StableSR CFW VAE" if config["fusion_levels"] else "SD VAE"
    check_weights(what, expected, vae_sd, file_key=lambda k: prefix + k)
    model.load_state_dict(vae_sd, strict=True, assign=True)
    model.requires_grad_(False)
    cfw = bool(config["fusion_levels"])
    down = model.downscale
    return VAEDescriptor(
        model,
        arch="stablesr_cfw" if cfw else "sd_vae",
        name="StableSR CFW VAE" if cfw else "SD VAE (kl-f8)",
        purpose="Module",
        scale=1,
        in_channels=config["in_channels"],
        out_channels=config["out_channels"],
        size_multiple=down,
        min_size=down,
        supports_half=True,
        supports_bf16=True,
        config=config,
        ignored_keys=ignored,
        bytes_per_px=_DECODE_BYTES_PER_LATENT_PX[cfw] * (config["ch"] / 128.0),
    )


def load_cfw(state_dict: StateDict) -> VAEDescriptor:
    """Registry loader of ``"stablesr_cfw"``: refuses a VAE without fusion layers."""
    if not detect_cfw(state_dict):
        raise UnsupportedModelError("not a StableSR CFW VAE: no decoder.fusion_layer_* keys next to the VAE keys")
    return load_vae(state_dict)


def load_sd_vae(state_dict: StateDict) -> VAEDescriptor:
    """Registry loader of ``"sd_vae"``."""
    if not detect_sd_vae(state_dict):
        raise UnsupportedModelError("not a plain LDM-layout SD VAE state dict")
    return load_vae(state_dict)


CFW_ARCHITECTURE = Architecture(
    id="stablesr_cfw",
    name="StableSR CFW VAE",
    detect=detect_cfw,
    load=load_cfw,
    wrapper_preference="state_dict",
    key_hints=("decoder.fusion_layer_1.encode_enc_1.conv1.weight", "encoder.conv_in.weight"),
)
SD_VAE_ARCHITECTURE = Architecture(
    id="sd_vae",
    name="Stable Diffusion VAE",
    detect=detect_sd_vae,
    load=load_sd_vae,
    wrapper_preference="state_dict",
    key_hints=("encoder.conv_in.weight", "decoder.conv_in.weight", "post_quant_conv.weight"),
)
ARCHITECTURES: tuple[Architecture, ...] = (CFW_ARCHITECTURE, SD_VAE_ARCHITECTURE)
