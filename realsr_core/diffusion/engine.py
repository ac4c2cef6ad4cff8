"""StableSR as one engine that any front-end drives: the command line, ComfyUI's node, the webui script.

The engine owns the method: LR preparation (bicubic upscale, the official reflect padding to 32 px),
the official tile sizes, whole or windowed (tiled) VAE passes, CFW decoding, cropping and the colour fix.
A front-end supplies two small backends:

* a :class:`VAEBackend`: encode padded pixels to an unscaled latent and decode it back (with CFW when it
  has one), whole or window by window;
* a :data:`SampleFn`: turn the LR latent into the sampled latent.  The core's own backend
  (:class:`CoreSampler`) runs the official canvas sampler (respaced DDPM or DDIM, per-step Gaussian tile
  aggregation) on the core UNet, time-aware encoder and SFT; ComfyUI's node samples with the host's
  samplers on its patched MODEL.

Data flow: image (B, C, H, W) in [0, 1] -> ``prepare_image`` -> ``vae.encode`` -> ``sample`` ->
``vae.decode`` -> ``finish`` (crop, colour fix) -> image (B, 3, s*H, s*W) in [0, 1].
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal, Protocol

import torch
import torch.nn.functional as F
from torch import Tensor

from ..colorfix import color_fix
from ..errors import InvalidInputError
from ..models.stablesr.cfw import VAEDescriptor
from ..tiling import CancelFn, ProgressFn, tiled_vae_decode, tiled_vae_encode
from .pipeline import EncoderFn, UNetFn, stablesr_sample
from .samplers import Prediction
from .schedule import make_schedule

__all__ = [
    "PAD_MULTIPLE", "TILED_VAE_AUTO_PIXELS", "CoreSampler", "CoreVAE", "SampleFn", "StableSROptions", "VAEBackend",
    "finish", "official_tiles", "prepare_image", "run_stablesr",
]

Start = Literal["lr_latent", "noise"]
ColorFix = Literal["wavelet", "adain", "none"]
TiledVAE = Literal["auto", "on", "off"]

PAD_MULTIPLE = 32  # image pixels: the official script reflect-pads right / bottom to a multiple of 32
# Official latent tiles (tile, overlap): the 512 models and the 768-v model.
OFFICIAL_TILES: dict[str, tuple[int, int]] = {"eps": (64, 32), "v": (96, 48)}
# "auto" tiles the VAE above this many image pixels (2 MP: a 1448x1448 image).
TILED_VAE_AUTO_PIXELS = 2 * 1024 * 1024
VAE_ENCODE_TILE, VAE_ENCODE_OVERLAP, VAE_ENCODE_CONTEXT = 512, 64, 64  # image pixels
VAE_DECODE_TILE, VAE_DECODE_OVERLAP, VAE_DECODE_CONTEXT = 64, 8, 8  # latent pixels


@dataclass(frozen=True)
class StableSROptions:
    """What a user chooses; 0 tiles mean the official ones for the model (64/32, 96/48 for 768-v)."""

    upscale: float = 4.0
    steps: int = 200
    seed: int = 0
    start: Start = "lr_latent"
    tile_size: int = 0
    tile_overlap: int = 0
    color_fix: ColorFix = "wavelet"
    color_fix_strength: float = 1.0
    cfw_weight: float = 0.5
    tiled_vae: TiledVAE = "auto"

    def check(self) -> None:
        """Refuse values outside what the method takes, naming the option and the range."""
        if not (isinstance(self.upscale, (int, float)) and 1.0 <= float(self.upscale) <= 16.0):
            raise InvalidInputError(f"upscale must be a number in [1, 16], got {self.upscale!r}")
        if isinstance(self.steps, bool) or not isinstance(self.steps, int) or not 1 <= self.steps <= 1000:
            raise InvalidInputError(f"steps must be an integer in [1, 1000], got {self.steps!r}")
        if self.start not in ("lr_latent", "noise"):
            raise InvalidInputError(f"start must be 'lr_latent' or 'noise', got {self.start!r}")
        if self.color_fix not in ("wavelet", "adain", "none"):
            raise InvalidInputError(f"color_fix must be 'wavelet', 'adain' or 'none', got {self.color_fix!r}")
        if self.tiled_vae not in ("auto", "on", "off"):
            raise InvalidInputError(f"tiled_vae must be 'auto', 'on' or 'off', got {self.tiled_vae!r}")
        for name in ("color_fix_strength", "cfw_weight"):
            v = getattr(self, name)
            if not isinstance(v, (int, float)) or not 0.0 <= float(v) <= 1.0:
                raise InvalidInputError(f"{name} must be in [0, 1], got {v!r}")
        for name in ("tile_size", "tile_overlap"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise InvalidInputError(f"{name} must be an integer >= 0 (0: official), got {v!r}")


def official_tiles(prediction: Prediction, tile: int = 0, overlap: int = 0) -> tuple[int, int]:
    """Latent tile and overlap: 0 takes the official value for the model (64 / 32, or 96 / 48 for 768-v)."""
    default_tile, default_overlap = OFFICIAL_TILES[prediction]
    tile, overlap = tile or default_tile, overlap or default_overlap
    if overlap >= tile:
        raise InvalidInputError(f"tile_overlap ({overlap}) must be smaller than tile_size ({tile})")
    return tile, overlap


def prepare_image(image: Tensor, upscale: float) -> tuple[Tensor, Tensor]:
    """LR image -> (bicubic-upscaled RGB, the same reflect-padded to a multiple of 32 px).

    The official script pads to 32 px (not just the VAE's 8), so the latent is a multiple of 4 like the
    official one; the padding is cropped after decoding.

    Args:
        image: (B, C, H, W) in [0, 1], C = 1 (gray, repeated to RGB), 3, or 4 / 2 (alpha dropped).

    Returns:
        ``(up, padded)``: (B, 3, round(H*s), round(W*s)) and (B, 3, H', W') with H', W' multiples of 32,
        float32 in [0, 1].
    """
    if not isinstance(image, Tensor) or image.ndim != 4 or image.shape[1] not in (1, 2, 3, 4):
        shape = tuple(image.shape) if isinstance(image, Tensor) else type(image).__name__
        raise InvalidInputError(f"expected an image (B, C, H, W) with 1 to 4 channels, got {shape}")
    x = image[:, :3] if image.shape[1] >= 3 else image[:, :1].expand(-1, 3, -1, -1)
    x = x.float()
    h, w = round(x.shape[-2] * upscale), round(x.shape[-1] * upscale)
    if h < 8 or w < 8:
        raise InvalidInputError(f"the upscaled image would be {w}x{h}; StableSR needs at least 8x8 pixels")
    up = F.interpolate(x, size=(h, w), mode="bicubic", align_corners=False).clamp(0, 1) if (h, w) != x.shape[-2:] else x
    ph, pw = -h % PAD_MULTIPLE, -w % PAD_MULTIPLE
    padded = up
    if ph or pw:
        # Reflection needs the pad to be shorter than the side; tiny images replicate instead.
        mode = "reflect" if ph < h and pw < w else "replicate"
        padded = F.pad(up, (0, pw, 0, ph), mode=mode)
    return up, padded


def finish(decoded: Tensor, size: tuple[int, int], reference: Tensor, method: ColorFix, strength: float = 1.0) -> Tensor:
    """Crop the padding, colour-fix against the upscaled LR image, clamp: (B, 3, h, w) in [0, 1]."""
    h, w = size
    img = decoded[:, :3, :h, :w].float()
    if method != "none" and strength > 0:
        img = color_fix(img, reference.to(img.device, img.dtype), method=method, strength=strength)
    return img.clamp(0, 1)


class VAEBackend(Protocol):
    """Encode / decode for the engine; images are NCHW in [0, 1], latents unscaled (B, 4, H/8, W/8)."""

    def use_tiled(self, mode: TiledVAE, padded: Tensor) -> bool:
        """Whether to run window by window (shared GroupNorm statistics) for this image."""

    def encode(self, padded: Tensor, tiled: bool) -> Tensor:
        """The latent of the padded image."""

    def decode(self, latent: Tensor, padded: Tensor, cfw_weight: float, tiled: bool) -> Tensor:
        """The image of a latent; a CFW backend fuses the padded LR image's features with ``cfw_weight``."""


#: ``sample(latent, tile, overlap) -> latent``: unscaled LR latent in, unscaled sampled latent out.
SampleFn = Callable[[Tensor, int, int], Tensor]


def run_stablesr(
    image: Tensor,
    *,
    vae: VAEBackend,
    sample: SampleFn,
    prediction: Prediction,
    options: StableSROptions = StableSROptions(),
) -> tuple[Tensor, Tensor]:
    """StableSR on images, driven by the front-end's backends.

    Args:
        image: (B, C, H, W) in [0, 1] (gray / alpha handled as in :func:`prepare_image`).
        vae: encode / decode backend.
        sample: sampling backend (see :data:`SampleFn`).
        prediction: ``"eps"`` (SD 2.1 512) or ``"v"`` (768-v): picks the official tiles.
        options: the user's choices.

    Returns:
        ``(image, latent)``: (B, 3, round(s*H), round(s*W)) in [0, 1], and the sampled unscaled latent.
    """
    options.check()
    tile, overlap = official_tiles(prediction, options.tile_size, options.tile_overlap)
    up, padded = prepare_image(image, float(options.upscale))
    tiled = vae.use_tiled(options.tiled_vae, padded)
    latent = vae.encode(padded, tiled)
    samples = sample(latent, tile, overlap)
    decoded = vae.decode(samples, padded, float(options.cfw_weight), tiled)
    return finish(decoded, tuple(up.shape[-2:]), up, options.color_fix, float(options.color_fix_strength)), samples


# ---------------------------------------------------------------------------- the core's own backends


class CoreVAE:
    """The engine's VAE backend on the core's SD VAE (or CFW VAE) descriptor.

    Encoding takes the posterior mean, as ComfyUI's VAE does (the official script draws a sample), so the
    command line and the ComfyUI node start from the same latent.  Decoding uses the CFW decoder when
    ``cfw`` is given (fusing the LR image's encoder features), else the SD VAE's, whose image is clamped to
    [0, 1] before the colour fix, as ComfyUI's VAE does.
    """

    def __init__(self, vae: VAEDescriptor, cfw: VAEDescriptor | None = None, *, output_device: torch.device | str = "cpu",
                 progress: ProgressFn | None = None, cancel: CancelFn | None = None) -> None:
        self.vae, self.cfw = vae, cfw
        self.output_device = torch.device(output_device)
        self.progress, self.cancel = progress, cancel

    def use_tiled(self, mode: TiledVAE, padded: Tensor) -> bool:
        if mode != "auto":
            return mode == "on"
        return padded.shape[-2] * padded.shape[-1] > TILED_VAE_AUTO_PIXELS

    def encode(self, padded: Tensor, tiled: bool) -> Tensor:
        vae = self.vae
        x = (padded * 2 - 1).to(vae.device, vae.dtype)
        if tiled:
            return tiled_vae_encode(vae, x, VAE_ENCODE_TILE, VAE_ENCODE_OVERLAP, context=VAE_ENCODE_CONTEXT,
                                    return_features=False, output_device=self.output_device,
                                    progress=self.progress, cancel=self.cancel)[0].float()
        return vae.encode(x, return_features=False)[0].float().to(self.output_device)

    def decode(self, latent: Tensor, padded: Tensor, cfw_weight: float, tiled: bool) -> Tensor:
        dec = self.cfw if self.cfw is not None else self.vae
        w = cfw_weight if self.cfw is not None else 0.0
        feats: Sequence[Tensor] | None = None
        kw = {"output_device": self.output_device, "progress": self.progress, "cancel": self.cancel}
        if w > 0:
            x = (padded * 2 - 1).to(dec.device, dec.dtype)
            if tiled:
                feats = tiled_vae_encode(dec, x, VAE_ENCODE_TILE, VAE_ENCODE_OVERLAP, context=VAE_ENCODE_CONTEXT, **kw)[2]
            else:
                feats = dec.encode(x, return_features=True)[2]
        if tiled:
            out = tiled_vae_decode(dec, latent.float(), feats, w, VAE_DECODE_TILE, VAE_DECODE_OVERLAP,
                                   context=VAE_DECODE_CONTEXT, **kw)
        else:
            out = dec.decode(latent.to(dec.device, dec.dtype), feats, w).to(self.output_device)
        img = (out.float() + 1) / 2
        # The SD VAE's image is clamped as ComfyUI's VAE clamps its decode, so both front-ends colour-fix the same
        # image (the official script colour-fixes before clamping; a trained VAE decodes within range almost
        # everywhere).  The CFW decode is not clamped, in both front-ends.
        return img if self.cfw is not None else img.clamp(0, 1)


class CoreSampler:
    """The engine's sampling backend on the core UNet and StableSR module: the official canvas sampler.

    Args:
        unet: SFT-capable UNet (:class:`~realsr_core.models.stablesr.unet.StableSRUNet`).
        encoder: the module's time-aware encoder (``encoder(lr_latent, t)``).
        sft: the module's SFT layers.
        context: (1, 77, D) text context (the official empty prompt), on the UNet's device.
        prediction: ``"eps"`` or ``"v"``.
        sampler: ``"ddpm"`` (official) or ``"ddim"``.
        latent_scale: SD's 0.18215 between the VAE latent and the diffusion latent.
        noise_x_T, step_noises: noises replacing the seeded draws (to reproduce a recorded run).
    """

    def __init__(self, unet: UNetFn, encoder: EncoderFn, sft: object, context: Tensor | None, *,
                 prediction: Prediction, steps: int, seed: int, start: Start = "lr_latent",
                 sampler: Literal["ddpm", "ddim"] = "ddpm", latent_scale: float = 0.18215,
                 device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
                 progress: ProgressFn | None = None, cancel: CancelFn | None = None,
                 noise_x_T: Tensor | None = None, step_noises: Tensor | None = None) -> None:
        self.unet, self.encoder, self.sft, self.context = unet, encoder, sft, context
        self.noise_x_T, self.step_noises = noise_x_T, step_noises  # given noises replace the seeded draws
        self.prediction, self.steps, self.seed, self.start, self.sampler = prediction, steps, seed, start, sampler
        self.latent_scale, self.device, self.dtype = latent_scale, torch.device(device), dtype
        self.progress, self.cancel = progress, cancel

    def __call__(self, latent: Tensor, tile: int, overlap: int) -> Tensor:
        # x_T's noise, then each step's, drawn on the CPU from the seed (the order ComfyUI's node draws them),
        # so a seed gives the same image on every device and in both front-ends.
        gen = torch.Generator(device="cpu").manual_seed(int(self.seed))
        scaled = (latent.float() * self.latent_scale).to(self.device)
        noise = torch.randn(scaled.shape, generator=gen, dtype=torch.float32) if self.noise_x_T is None else self.noise_x_T
        noise = noise.to(self.device)
        unet, encoder, dtype = self.unet, self.encoder, self.dtype

        def unet_fn(x: Tensor, t: Tensor, ctx: Tensor | None, cond: object, sft: object) -> Tensor:
            ctx = None if ctx is None else ctx.to(dtype)
            return unet(x.to(dtype), t, ctx, cond, sft).float()

        def encoder_fn(lr: Tensor, t: Tensor) -> object:
            return encoder(lr.to(dtype), t)

        out = stablesr_sample(
            unet_fn, encoder_fn, self.sft, scaled, self.context, steps=self.steps, prediction=self.prediction,
            tile_size=tile, tile_overlap=overlap, start="lr" if self.start == "lr_latent" else "noise",
            sampler=self.sampler, generator=gen, noise_x_T=noise, noises=self.step_noises,
            schedule=make_schedule(self.steps), progress=self.progress, cancel=self.cancel,
        )
        return (out.float() / self.latent_scale).cpu()

