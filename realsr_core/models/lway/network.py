"""LWay's LR-reconstruction branch: a degradation encoder E and a reconstructor R.

Paper: H. Chen et al., "Low-Res Leads the Way: Improving Generalization for Super-Resolution by
Self-Supervised Learning", CVPR 2024, Sec. 3.1.  Its authors released neither code nor weights; they point
to the DegAE degradation encoder and reconstruction head for the layout.  The modules below are our own
design after that description (see ``shared/research/lway_crlsr_degradation.md`` Sec. 1.2), sized to
train on a CPU::

    E  (degradation encoder)  an image -> a degradation embedding e (B, embed_dim, 1, 1), embed_dim = 512
    R  (reconstructor)        an image I and e -> I degraded the way e describes, same size as I

Step 1 (:meth:`LWayReconstruction.training_losses`) trains both on pairs made by the toolkit's
degradation pipelines; step 2 (``realsr_core.adapt.lway``) freezes them and fine-tunes an SR model.

Differences from the DegAE layout the paper points to, and why:

* E's feature extractor is not a frozen, separately pre-trained SR network (DegAE takes the features of
  an MSRResNet trained on clean DIV2K; no such weights are available to us).  E is a small conv trunk
  (``conv_first`` + residual blocks) trained *jointly* with R in step 1.
* Both E's trunk and R run on a space-to-depth grid (pixel-unshuffle by ``unshuffle`` = 2, lossless;
  R pixel-shuffles back at the end).  Their inputs are images at the SR size whose degradation lives at
  the LR size (a degraded LR upsampled by 2-4x), so the half-resolution grid loses nothing and costs a
  quarter of the full-resolution convolutions: at full resolution R alone cost ~3x the shipped CRL-SR
  per fine-tuning step on a CPU.
* E's head keeps DegAE's shape (strided convs, global average pool, three 1x1 convs to 512) with
  narrower, padded 3x3 stride-2 convs: fewer parameters, and any input size of at least 1 pixel works.
* R keeps DegAE's trunk (``conv_first``, 4 residual blocks each followed by a StyleGAN2 modulated conv,
  ``conv_hr``, ``conv_last``) at a smaller width, and adds a global skip from its input image with a
  small-initialised ``conv_last``: a fresh R is close to the identity, which is already a fair guess of a
  degraded image at the same size, so training starts from a good point and converges faster.
* Noise injection (StyleGAN2) is built but only applied in training mode, so a frozen R is deterministic.

State-dict keys: ``encoder.{conv_first,body.{i}.conv{1,2},conv_body,down.{i},mlp.{i}}`` and
``reconstructor.{conv_first,blocks.{i}.{res.conv1,res.conv2,modconv.weight,modconv.bias,modconv.style,
noise_strength},conv_hr,conv_last}``.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "DegradationEncoder",
    "LWayConfig",
    "LWayReconstruction",
    "ModulatedConv2d",
    "ModulatedResBlock",
    "Reconstructor",
    "bicubic_resize",
]

_SLOPE = 0.1  # LeakyReLU slope of the DegAE modules
_LAST_INIT_SCALE = 0.1  # R's conv_last starts small: R(I, e) ~ I (global skip) at initialisation


def _to_grid(x: Tensor, factor: int) -> Tensor:
    """Replicate-pad (B, C, H, W) to multiples of ``factor`` and pixel-unshuffle: (B, C*f^2, ceil(H/f), ceil(W/f))."""
    if factor == 1:
        return x
    ph, pw = -x.shape[-2] % factor, -x.shape[-1] % factor
    if ph or pw:
        x = F.pad(x, (0, pw, 0, ph), mode="replicate")
    return F.pixel_unshuffle(x, factor)


def bicubic_resize(x: Tensor, size: tuple[int, int]) -> Tensor:
    """Bicubic resize (PyTorch's, ``align_corners=False``), not clamped: the "up" of LWay.

    Args:
        x: (B, C, h, w).
        size: target (H, W).

    Returns:
        (B, C, H, W), same dtype.
    """
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    return F.interpolate(x, size=size, mode="bicubic", align_corners=False)


class _ResBlock(nn.Module):
    """``x + conv2(lrelu(conv1(x)))`` (3x3 convs, no normalisation).  Shape: (B, C, H, W) -> same."""

    def __init__(self, num_feat: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(num_feat, num_feat, 3, 1, 1)
        self.conv2 = nn.Conv2d(num_feat, num_feat, 3, 1, 1)

    def forward(self, x: Tensor) -> Tensor:
        return x + self.conv2(F.leaky_relu(self.conv1(x), _SLOPE))


@dataclass(frozen=True)
class LWayConfig:
    """Sizes of E and R (all readable from a state dict's shapes).

    Attributes:
        embed_dim: size of the degradation embedding (512 in the paper).
        enc_feat: channels of E's full-resolution trunk.
        enc_blocks: residual blocks of E's trunk.
        enc_channels: output channels of E's stride-2 convs (one entry per conv).
        mlp_layers: 1x1 convs of E's head after the pooling (the last one outputs ``embed_dim``).
        rec_feat: channels of R.
        rec_blocks: residual + modulated-conv blocks of R (4 in DegAE).
        noise: R has StyleGAN2 noise-injection strengths (applied in training mode only).
        unshuffle: space-to-depth factor of E's trunk and of R (1 = full resolution).
        kernel_size: side of the blur kernel R predicts from the embedding for its base path (0 = no base
            path: R's global skip is the input image itself).
        scale: the SR factor R's base path resamples by (down, then back up); used with ``kernel_size``.
    """

    embed_dim: int = 512
    enc_feat: int = 32
    enc_blocks: int = 2
    enc_channels: tuple[int, ...] = (64, 128, 256)
    mlp_layers: int = 3
    rec_feat: int = 48
    rec_blocks: int = 4
    noise: bool = True
    unshuffle: int = 2
    kernel_size: int = 0
    scale: int = 0

    def __post_init__(self) -> None:
        object.__setattr__(self, "enc_channels", tuple(int(c) for c in self.enc_channels))
        for name in ("embed_dim", "enc_feat", "mlp_layers", "rec_feat", "unshuffle"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"LWayConfig.{name} must be an integer >= 1, got {v!r}")
        for name in ("enc_blocks", "rec_blocks"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 0:
                raise ValueError(f"LWayConfig.{name} must be an integer >= 0, got {v!r}")
        if self.kernel_size < 0 or (self.kernel_size and self.kernel_size % 2 == 0) or self.scale < 0:
            raise ValueError(f"LWayConfig: kernel_size must be 0 or odd and scale >= 0, got {self.kernel_size}, "
                             f"{self.scale}")
        if not self.enc_channels or min(self.enc_channels) < 1:
            raise ValueError(f"LWayConfig.enc_channels must be a non-empty list of widths, got {self.enc_channels}")

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["enc_channels"] = list(self.enc_channels)
        return d


class DegradationEncoder(nn.Module):
    """E: an image to its degradation embedding.

    ``conv_first`` (3x3) + LeakyReLU, ``body`` residual blocks and ``conv_body`` with a long skip, all on
    the pixel-unshuffled input (``unshuffle``); then ``down`` (3x3 stride-2 convs, each + LeakyReLU), a
    global average pool and ``mlp`` (1x1 convs, LeakyReLU between them, none after the last).

    Args:
        embed_dim, enc_feat, enc_blocks, enc_channels, mlp_layers, unshuffle: see :class:`LWayConfig`.
        in_channels: image channels.

    Shape:
        (B, in_channels, H, W), any value range (images in [0, 1]), H, W >= 1 -> (B, embed_dim, 1, 1).
    """

    def __init__(
        self,
        embed_dim: int = 512,
        enc_feat: int = 32,
        enc_blocks: int = 2,
        enc_channels: Sequence[int] = (64, 128, 256),
        mlp_layers: int = 3,
        unshuffle: int = 2,
        in_channels: int = 3,
    ) -> None:
        super().__init__()
        self.unshuffle = unshuffle
        self.conv_first = nn.Conv2d(in_channels * unshuffle * unshuffle, enc_feat, 3, 1, 1)
        self.body = nn.Sequential(*[_ResBlock(enc_feat) for _ in range(enc_blocks)])
        self.conv_body = nn.Conv2d(enc_feat, enc_feat, 3, 1, 1)
        widths = [enc_feat, *enc_channels]
        self.down = nn.ModuleList(nn.Conv2d(a, b, 3, 2, 1) for a, b in zip(widths[:-1], widths[1:], strict=True))
        mlp = [widths[-1]] + [embed_dim] * mlp_layers
        self.mlp = nn.ModuleList(nn.Conv2d(a, b, 1) for a, b in zip(mlp[:-1], mlp[1:], strict=True))

    def forward(self, x: Tensor) -> Tensor:
        feat = F.leaky_relu(self.conv_first(_to_grid(x, self.unshuffle)), _SLOPE)
        x = feat + self.conv_body(self.body(feat))
        for conv in self.down:
            x = F.leaky_relu(conv(x), _SLOPE)
        x = x.mean(dim=(-2, -1), keepdim=True)  # global average pool: the embedding ignores the image size
        for i, conv in enumerate(self.mlp):
            x = conv(x)
            if i < len(self.mlp) - 1:
                x = F.leaky_relu(x, _SLOPE)
        return x


class ModulatedConv2d(nn.Module):
    """A StyleGAN2 modulated 3x3 convolution, conditioned on an embedding.

    ``style = Linear(embed_dim -> in_channels)(e)`` scales the weight along its *input*-channel axis per
    sample; demodulation rescales every output channel of that per-sample weight to unit L2 norm (so the
    output keeps the input's scale whatever the style); the per-sample weights run as one grouped
    convolution (groups = B).  A bias is added afterwards.

    Args:
        in_channels, out_channels: feature channels.
        embed_dim: size of the embedding.
        kernel_size: odd kernel side (zero padding keeps the size).

    Shape:
        x (B, in_channels, H, W), e (B, embed_dim, 1, 1) or (B, embed_dim) -> (B, out_channels, H, W).
    """

    def __init__(self, in_channels: int, out_channels: int, embed_dim: int, kernel_size: int = 3) -> None:
        super().__init__()
        self.in_channels, self.out_channels, self.kernel_size = in_channels, out_channels, kernel_size
        # Demodulation normalises every per-sample filter, so the weight's overall scale has no effect
        # on the output: a unit-variance init (StyleGAN2's) is as good as any.
        self.weight = nn.Parameter(torch.randn(out_channels, in_channels, kernel_size, kernel_size))
        self.bias = nn.Parameter(torch.zeros(out_channels))
        self.style = nn.Linear(embed_dim, in_channels)
        nn.init.zeros_(self.style.weight)
        nn.init.ones_(self.style.bias)  # a fresh layer is an ordinary (demodulated) convolution

    def forward(self, x: Tensor, e: Tensor) -> Tensor:
        b, c, h, w = x.shape
        style = self.style(e.reshape(b, -1))  # (B, in)
        weight = self.weight[None] * style[:, None, :, None, None]  # (B, out, in, k, k)
        weight = weight * torch.rsqrt(weight.pow(2).sum(dim=(2, 3, 4), keepdim=True) + 1e-8)
        weight = weight.reshape(b * self.out_channels, c, self.kernel_size, self.kernel_size)
        out = F.conv2d(x.reshape(1, b * c, h, w), weight, padding=self.kernel_size // 2, groups=b)
        return out.reshape(b, self.out_channels, h, w) + self.bias[None, :, None, None]


class ModulatedResBlock(nn.Module):
    """One block of R: a residual block, then a modulated conv (+ optional noise) and LeakyReLU.

    Shape:
        x (B, num_feat, H, W), e (B, embed_dim, 1, 1) -> (B, num_feat, H, W).
    """

    def __init__(self, num_feat: int, embed_dim: int, noise: bool = True) -> None:
        super().__init__()
        self.res = _ResBlock(num_feat)
        self.modconv = ModulatedConv2d(num_feat, num_feat, embed_dim)
        # StyleGAN2 noise injection: one learnable strength, initialised to 0 (no noise at the start).
        self.noise_strength = nn.Parameter(torch.zeros(())) if noise else None

    def forward(self, x: Tensor, e: Tensor) -> Tensor:
        x = self.modconv(self.res(x), e)
        if self.noise_strength is not None and self.training:
            # Training only: a frozen R must be deterministic (step 2 compares its output across steps).
            x = x + self.noise_strength * torch.randn_like(x[:, :1])
        return F.leaky_relu(x, _SLOPE)


class Reconstructor(nn.Module):
    """R: an image and a degradation embedding to the image degraded accordingly, at the same size.

    On the pixel-unshuffled image (``unshuffle``): ``conv_first`` + LeakyReLU, ``blocks``
    (:class:`ModulatedResBlock`), ``conv_hr`` + LeakyReLU, ``conv_last``; pixel-shuffled back and added to
    a base image (global skip).

    The base is the input itself, or (``kernel_size`` > 0) the input blurred by a kernel predicted from the
    embedding (``kernel_head``: a linear map to ``kernel_size^2`` logits, softmax: positive, sums to 1) and
    resampled down by ``scale`` and back up (bicubic).  Why: the target of step 1, an upsampled LR image, is
    band-limited to the LR grid and its blur varies per image; a residual network starting from the input
    has to learn a strong per-image low-pass filter from scratch (after 1,350 CPU steps ours still
    reconstructed the HR crop worse than a blurry SR result, which made LWay's loss prefer blur), while a
    predicted kernel plus the known resampling gives that part directly and leaves the network the
    non-linear rest (noise, JPEG, sensor effects).

    Args:
        embed_dim, rec_feat, rec_blocks, noise, unshuffle, kernel_size, scale: see :class:`LWayConfig`.
        in_channels: image channels (input and output).

    Shape:
        image (B, in_channels, H, W) (in [0, 1], or an SR output slightly outside), e (B, embed_dim, 1, 1)
        -> (B, in_channels, H, W), not clamped.
    """

    def __init__(
        self,
        embed_dim: int = 512,
        rec_feat: int = 48,
        rec_blocks: int = 4,
        noise: bool = True,
        unshuffle: int = 2,
        in_channels: int = 3,
        kernel_size: int = 0,
        scale: int = 0,
    ) -> None:
        super().__init__()
        self.unshuffle = unshuffle
        self.kernel_size = kernel_size
        if kernel_size:
            self.kernel_head = nn.Linear(embed_dim, kernel_size * kernel_size)
            with torch.no_grad():  # start from a Gaussian of width 1.5 px, whatever the embedding
                self.kernel_head.weight.normal_(0.0, 1e-3)
                r = torch.arange(kernel_size, dtype=torch.float32) - kernel_size // 2
                self.kernel_head.bias.copy_((-(r[:, None] ** 2 + r[None] ** 2) / (2 * 1.5**2)).flatten())
            # Stored in the state dict so a loaded file knows its factor (float: the loader casts to float32).
            self.register_buffer("base_scale", torch.tensor(float(scale)))
        grid_channels = in_channels * unshuffle * unshuffle
        self.conv_first = nn.Conv2d(grid_channels, rec_feat, 3, 1, 1)
        self.blocks = nn.ModuleList(ModulatedResBlock(rec_feat, embed_dim, noise) for _ in range(rec_blocks))
        self.conv_hr = nn.Conv2d(rec_feat, rec_feat, 3, 1, 1)
        self.conv_last = nn.Conv2d(rec_feat, grid_channels, 3, 1, 1)
        with torch.no_grad():
            self.conv_last.weight.mul_(_LAST_INIT_SCALE)
            self.conv_last.bias.zero_()

    def base(self, image: Tensor, e: Tensor) -> Tensor:
        """The base image the residual network adds to (see the class doc); (B, C, H, W) -> same."""
        if not self.kernel_size:
            return image
        b, c, h, w = image.shape
        k = self.kernel_size
        kernel = self.kernel_head(e.reshape(b, -1)).softmax(-1).reshape(b, 1, k, k).to(image.dtype)
        x = F.pad(image, (k // 2,) * 4, mode="replicate").reshape(1, b * c, h + k - 1, w + k - 1)
        x = F.conv2d(x, kernel.repeat_interleave(c, dim=0), groups=b * c).reshape(b, c, h, w)
        s = int(self.base_scale)
        if s > 1:
            x = bicubic_resize(bicubic_resize(x, (max(1, h // s), max(1, w // s))), (h, w))
        return x

    def forward(self, image: Tensor, e: Tensor) -> Tensor:
        h, w = image.shape[-2:]
        x = F.leaky_relu(self.conv_first(_to_grid(image, self.unshuffle)), _SLOPE)
        for block in self.blocks:
            x = block(x, e)
        x = self.conv_last(F.leaky_relu(self.conv_hr(x), _SLOPE))
        if self.unshuffle > 1:
            x = F.pixel_shuffle(x, self.unshuffle)[..., :h, :w]
        return self.base(image, e) + x


@functools.lru_cache(maxsize=1)
def _offline_lpips() -> nn.Module | None:
    """LPIPS (AlexNet) when the ``lpips`` package and its backbone weights are already on disk, else None.

    Nothing is downloaded: the backbone file must be in torch's hub cache.
    """
    try:
        import lpips  # type: ignore[import-not-found]
    except ImportError:
        return None
    ckpt = Path(torch.hub.get_dir()) / "checkpoints" / "alexnet-owt-7be5be79.pth"
    if not ckpt.is_file():
        return None
    try:
        net = lpips.LPIPS(net="alex", verbose=False)
    except Exception:  # a changed API or a broken install: train with L1 only
        return None
    return net.eval().requires_grad_(False)


class LWayReconstruction(nn.Module):
    """LWay's LR-reconstruction branch: ``forward(sr, lr_up) = R(sr, E(lr_up))``.

    Args:
        embed_dim, enc_feat, enc_blocks, enc_channels, mlp_layers, rec_feat, rec_blocks, noise, unshuffle,
            kernel_size, scale: see :class:`LWayConfig`.
        lpips_weight: weight of the LPIPS term of step 1 (the paper's loss is L1 + LPIPS).  LPIPS is used
            only when the ``lpips`` package and its AlexNet weights are already installed (nothing is
            downloaded); otherwise step 1 trains with L1 alone.

    Both E and R are trained together in step 1 (E has no separately pre-trained extractor here).
    """

    def __init__(
        self,
        embed_dim: int = 512,
        enc_feat: int = 32,
        enc_blocks: int = 2,
        enc_channels: Sequence[int] = (64, 128, 256),
        mlp_layers: int = 3,
        rec_feat: int = 48,
        rec_blocks: int = 4,
        noise: bool = True,
        unshuffle: int = 2,
        kernel_size: int = 0,
        scale: int = 0,
        *,
        lpips_weight: float = 1.0,
    ) -> None:
        super().__init__()
        self.config = LWayConfig(embed_dim, enc_feat, enc_blocks, tuple(enc_channels), mlp_layers, rec_feat,
                                 rec_blocks, noise, unshuffle, kernel_size, scale)
        self.lpips_weight = float(lpips_weight)
        self.encoder = DegradationEncoder(embed_dim, enc_feat, enc_blocks, enc_channels, mlp_layers, unshuffle)
        self.reconstructor = Reconstructor(embed_dim, rec_feat, rec_blocks, noise, unshuffle, 3, kernel_size, scale)

    @classmethod
    def from_config(cls, config: LWayConfig | dict[str, Any], **kwargs: Any) -> LWayReconstruction:
        cfg = config.to_dict() if isinstance(config, LWayConfig) else dict(config)
        return cls(**cfg, **kwargs)

    def embed(self, lr_up: Tensor) -> Tensor:
        """E: (B, 3, H, W) degraded image brought to the target size -> (B, embed_dim, 1, 1)."""
        return self.encoder(lr_up)

    def forward(self, sr: Tensor, lr_up: Tensor) -> Tensor:
        """Degrade ``sr`` the way ``lr_up`` is degraded: ``R(sr, E(lr_up))``.

        Args:
            sr: (B, 3, H, W) a clean (HR or super-resolved) image.
            lr_up: (B, 3, H', W') the degraded image, upsampled to the HR size (H' = H, W' = W in LWay;
                E pools globally, so other sizes work too).

        Returns:
            (B, 3, H, W), the reconstruction of ``lr_up`` from ``sr``, not clamped.
        """
        return self.reconstructor(sr, self.encoder(lr_up))

    def _pair(self, lr: Tensor, hr: Tensor) -> tuple[Tensor, Tensor]:
        """``(prediction, target)`` of step 1: ``R(hr, E(up(lr)))`` and ``up(lr)``."""
        if lr.dim() != 4 or hr.dim() != 4 or lr.shape[:2] != hr.shape[:2]:
            raise ValueError(f"expected lr (B, 3, h, w) and hr (B, 3, H, W), got {tuple(lr.shape)} and "
                             f"{tuple(hr.shape)}")
        # Step 1 works at the HR size (the authors' answer in their issue #1): the degraded image is
        # brought back to the HR size by bicubic upsampling, as the test LR will be in step 2.
        target = bicubic_resize(lr, (hr.shape[-2], hr.shape[-1]))
        return self(hr, target), target

    def training_losses(
        self,
        lr: Tensor,
        hr: Tensor,
        *,
        contrastive: bool = True,
        generator: torch.Generator | None = None,
    ) -> dict[str, Tensor]:
        """Step 1 losses of one batch (the trainer's interface).

        Args:
            lr: (B, 3, h, w) degraded images in [0, 1] (``degrade(hr)``, any scale).
            hr: (B, 3, H, W) clean images in [0, 1].
            contrastive, generator: unused (part of the trainer's interface).

        Returns:
            ``{"l1": ..., "total": ...}`` (plus ``"lpips"`` when available), scalar float32 tensors.
        """
        pred, target = self._pair(lr, hr)
        losses = {"l1": (pred.float() - target.float()).abs().mean()}
        total = losses["l1"]
        lp = _offline_lpips() if self.lpips_weight > 0 else None
        if lp is not None:
            lp = lp.to(hr.device)
            # LPIPS takes images in [-1, 1].
            losses["lpips"] = lp(pred.float() * 2 - 1, target.float() * 2 - 1).mean()
            total = total + self.lpips_weight * losses["lpips"]
        losses["total"] = total
        return losses

    @torch.no_grad()
    def eval_metrics(self, lr: Tensor, hr: Tensor) -> dict[str, float]:
        """Validation metrics for the trainer: PSNR (RGB, dB) of the reconstruction of ``up(lr)`` from
        ``hr`` (``psnr_rec``), and of ``hr`` itself as the reconstruction (``psnr_identity``, the floor).

        Args:
            lr: (1, 3, h, w) degraded image in [0, 1].
            hr: (1, 3, H, W) clean image in [0, 1].
        """
        pred, target = self._pair(lr, hr)
        target = target.float().clamp(0, 1)

        def psnr(x: Tensor) -> float:
            mse = (x.float().clamp(0, 1) - target).pow(2).mean().clamp_min(1e-12)
            return float(-10.0 * torch.log10(mse))

        return {"psnr_rec": psnr(pred), "psnr_identity": psnr(hr)}
