"""CRL-SR network: contrastive decoupling encoding and contrastive feature refinement.

Paper: J. Zhang, S. Lu, F. Zhan, Y. Yu, "Blind Image Super-Resolution via Contrastive Representation
Learning", arXiv 2107.00708 (2021).  No code or weights were released; the layer sizes of the paper's
network are in a supplement that is not available, so the layers below are our own design around the
components of its Fig. 1 (names from the paper)::

    inference    lr -> bicubic x s -> U_l -> Ē_l (encoder_lr) -> f̄_l -> D_ref (refine) -> + U_l -> I_s
    training     I_h -> Ē_h (encoder_hr) -> f̄_h
                 f̄_l, f̄_h -> proj_lr / proj_hr (two-layer MLP, S = 256, L2-normalised) -> L_bc    (Eqs. 2-3)
                 I_h, I_s, U_l -> E_f (feat_extractor) -> proj_feat -> f_h, f_s, condition -> L_SRNCE (Eqs. 4-6)
                 f_h -> D_rec (decoder_rec) -> L1 to I_h (Eq. 7);  L1(I_s, I_h)                    (Eq. 8)

Design for a small model that trains on a few CPU cores:

* Every encoder (``Ē_l``, ``Ē_h``, ``E_f``) takes a full-resolution image (``U_l``, ``I_h`` or ``I_s``) and
  goes to the LR grid at once: space-to-depth by ``scale`` (pixel-unshuffle, lossless) and a 3x3 conv,
  then residual blocks (conv-ReLU-conv + skip, no normalisation) at LR resolution and a closing conv
  with a long skip.  All ``M`` feature vectors of all encoders therefore sit at the same LR-grid
  positions: the positive of a vector is the other encoder's vector at the same position, the negatives
  are the other positions of the same image, as in the paper.
* The LR branch keeps the paper's input ``U_l`` (bicubic-upsampled LR).  Feeding the LR directly would
  be cheaper but equals the composition only away from the borders (bicubic replicates edge pixels,
  the conv zero-pads the unshuffled map), so it is not done.
* ``D_ref``: residual blocks on the LR grid, a conv with a skip, then sub-pixel upsampling (conv +
  pixel-shuffle, x2 stages for x4) to the HR size; it predicts the residual over ``U_l`` (global skip),
  and its last conv starts small, so a fresh network outputs nearly the bicubic image and training
  converges fast.
* Sizes: ``num_feat`` 64, 8 residual blocks in ``Ē_l`` and 8 in ``D_ref`` by default (the paper's big
  model has 15 in its encoder; its ablation network is "a few convolutional layers and residual
  blocks"): about 1.4 M inference parameters at x4.  The training-only parts (``Ē_h``, the three MLP
  heads, ``E_f``, ``D_rec``) are built only when ``training_parts`` is True and are never needed to run.

Key prefixes (the loader detects and separates them): inference ``encoder_lr.``, ``refine.``; training
only ``encoder_hr.``, ``proj_lr.``, ``proj_hr.``, ``feat_extractor.``, ``proj_feat.``, ``decoder_rec.``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..blocks.rrdb import ResidualBlockNoBN, conv2d_fused
from .losses import (
    TAU,
    bidirectional_contrastive_loss,
    conditional_contrastive_loss,
    contrastive_loss,
    gather_positions,
    reconstruction_loss,
    sample_positions,
)

__all__ = [
    "CRLSR",
    "INFERENCE_PREFIXES",
    "TRAINING_PREFIXES",
    "CRLSRConfig",
    "CRLSRLossConfig",
    "ProjectionHead",
    "ReconstructionDecoder",
    "RefinementDecoder",
    "UnshuffleEncoder",
    "bicubic_upsample",
    "upsample_factors",
]

INFERENCE_PREFIXES: tuple[str, ...] = ("encoder_lr.", "refine.")
TRAINING_PREFIXES: tuple[str, ...] = (
    "encoder_hr.",
    "proj_lr.",
    "proj_hr.",
    "feat_extractor.",
    "proj_feat.",
    "decoder_rec.",
)
SCALES: tuple[int, ...] = (2, 3, 4)
# Initial scale of the last conv of every residual branch (residual blocks, D_ref's output): small
# residuals keep the deep no-normalisation stacks near identity at the start (EDSR's reason for
# residual scaling) and make a fresh CRL-SR output close to bicubic.
_RESIDUAL_INIT_SCALE = 0.1


def upsample_factors(scale: int) -> tuple[int, ...]:
    """Pixel-shuffle factors of ``D_ref``'s upsampler: x4 as two x2 stages, x2 and x3 as one.

    Raises:
        ValueError: a scale other than 2, 3 or 4.
    """
    if scale not in SCALES:
        raise ValueError(f"CRL-SR supports scales {SCALES}, got {scale}")
    return (2, 2) if scale == 4 else (scale,)


def bicubic_upsample(lr: Tensor, scale: int) -> Tensor:
    """``U_l``: the LR image upsampled by ``scale`` with bicubic interpolation (not clamped).

    Args:
        lr: (B, C, h, w).
        scale: integer factor.

    Returns:
        (B, C, h * scale, w * scale), same dtype.
    """
    h, w = lr.shape[-2:]
    return F.interpolate(lr, size=(h * scale, w * scale), mode="bicubic", align_corners=False)


def _scale_last(conv: nn.Conv2d) -> None:
    with torch.no_grad():
        conv.weight.mul_(_RESIDUAL_INIT_SCALE)
        if conv.bias is not None:
            conv.bias.zero_()


def _residual_blocks(num_feat: int, num_blocks: int) -> nn.Sequential:
    blocks = [ResidualBlockNoBN(num_feat) for _ in range(num_blocks)]
    for block in blocks:
        _scale_last(block.conv2)
    return nn.Sequential(*blocks)


@dataclass(frozen=True)
class CRLSRConfig:
    """CRL-SR hyper-parameters.

    The first four are readable from an inference state dict's shapes; the last three size the
    training-only parts and are readable only when those are in the file.

    Attributes:
        scale: 2, 3 or 4.
        num_feat: channels of ``Ē_l``, ``Ē_h`` and ``D_ref``.
        enc_blocks: residual blocks of each of ``Ē_l`` and ``Ē_h`` (the paper's large model: 15).
        ref_blocks: residual blocks of ``D_ref``.
        proj_dim: ``S``, size of the L2-normalised embeddings (256 in the paper).
        ef_feat: channels of ``E_f`` and ``D_rec``.
        ef_blocks: residual blocks of ``E_f``.
    """

    scale: int = 4
    num_feat: int = 64
    enc_blocks: int = 8
    ref_blocks: int = 8
    proj_dim: int = 256
    ef_feat: int = 64
    ef_blocks: int = 2

    def __post_init__(self) -> None:
        upsample_factors(self.scale)
        for f in fields(self):
            v = getattr(self, f.name)
            least = 0 if f.name.endswith("blocks") else 1  # block counts may be 0, widths may not
            if not isinstance(v, int) or isinstance(v, bool) or v < least:
                raise ValueError(f"CRLSRConfig.{f.name} must be an integer >= {least}, got {v!r}")

    def to_dict(self) -> dict[str, int]:
        return asdict(self)


@dataclass(frozen=True)
class CRLSRLossConfig:
    """Training-only settings of the losses (not stored in a state dict).

    Attributes:
        tau: temperature of ``L_bc`` (Eq. 2), 0.07 in the paper.
        srnce_tau: divides the exponents of ``L_SRNCE``; 1 is Eq. (6) as written.
        srnce: ``"conditional"``: Eq. (6), the paper's CRL-SR (Table 1 model f); ``"infonce"``: plain InfoNCE
            [28] between ``f_h`` (anchors) and ``f_s`` at temperature ``srnce_tau``, without the condition,
            its pushing term and the penalty (Table 1 model e), to measure what the condition does.
        num_samples: positions drawn per image for the contrastive losses (our bound on ``M``; all
            positions when the LR grid has fewer).
        weight_bc, weight_srnce, weight_rec_sr, weight_rec_hr: weights of the four terms.  Eq. (8) sums
            ``L_SRNCE``, ``L_rec^sr`` and ``L_rec^hr`` with weight 1; the paper gives no weight for ``L_bc``
            relative to them, so it is 1 too (the defaults).

    Measured on CPU with a small x4 model (num_feat 32, 2+2 blocks, batch 4 of 64x64 crops of five
    scikit-image photos, bicubic + noise 15, Adam 1e-3, 600 steps; mean L1 on nine held-out 96x96
    astronaut crops: bicubic 0.0519, ablation 0.0415 on two seeds): the unit weights keep the SR at
    bicubic (0.0520).  ``L_bc``'s gradient on the shared ``Ē_l`` is ~300x the SR L1's at the start and,
    under Adam, starves it (``L_bc`` alone at weight 1: 0.0494; 0.01: 0.0434; 0.001: 0.0414).
    ``L_SRNCE``'s pushing term reaches ``e^2`` when ``f_s`` is opposite to the condition, more than the
    pulling term's ``e^1``, so wherever the condition is close to ``f_h`` (smooth regions) it drives
    ``I_s`` away from ``I_h`` (alone at weight 1: held-out L1 between 0.06 and 0.40 during the run; at
    0.01: 0.0410).  ``L_bc`` 0.001 with ``L_SRNCE`` 0.01: 0.0412.  Whether any setting beats the
    ablation needs full-length runs.
    """

    tau: float = TAU
    srnce_tau: float = 1.0
    srnce: str = "conditional"
    num_samples: int = 256
    weight_bc: float = 1.0
    weight_srnce: float = 1.0
    weight_rec_sr: float = 1.0
    weight_rec_hr: float = 1.0

    def __post_init__(self) -> None:
        if self.srnce not in ("conditional", "infonce"):
            raise ValueError(f"srnce must be 'conditional' (Eq. 6) or 'infonce', got {self.srnce!r}")


class UnshuffleEncoder(nn.Module):
    """A full-resolution image to features on the LR grid (``Ē_l``, ``Ē_h`` and ``E_f``).

    ``head`` (3x3 conv) on the pixel-unshuffled image, ``body`` residual blocks, ``tail`` (3x3 conv)
    added to the head's output.

    Args:
        scale: space-to-depth factor (the SR scale).
        num_feat: output channels.
        num_blocks: residual blocks.
        in_channels: image channels.

    Shape:
        (B, in_channels, H, W), H and W multiples of ``scale`` -> (B, num_feat, H / scale, W / scale).
    """

    def __init__(self, scale: int, num_feat: int, num_blocks: int, in_channels: int = 3) -> None:
        super().__init__()
        self.scale = scale
        self.head = nn.Conv2d(in_channels * scale * scale, num_feat, 3, 1, 1)
        self.body = _residual_blocks(num_feat, num_blocks)
        self.tail = nn.Conv2d(num_feat, num_feat, 3, 1, 1)

    def forward(self, x: Tensor) -> Tensor:
        feat = self.head(_compute_layout(F.pixel_unshuffle(x, self.scale)))
        return conv2d_fused(self.body(feat), self.tail, residual=feat)


class RefinementDecoder(nn.Module):
    """``D_ref``: LR-grid features to the HR residual over ``U_l``.

    ``body`` residual blocks, ``conv_body`` with a skip from the input, then ``upsample``: a conv to
    ``num_feat * r^2`` channels + pixel-shuffle(r) + ReLU per intermediate stage, and a last conv to
    ``out_channels * r^2`` + pixel-shuffle(r).

    Args:
        scale: 2, 3 or 4.
        num_feat: feature channels.
        num_blocks: residual blocks.
        out_channels: image channels.

    Shape:
        (B, num_feat, h, w) -> (B, out_channels, h * scale, w * scale), any range (a residual).
    """

    def __init__(self, scale: int, num_feat: int, num_blocks: int, out_channels: int = 3) -> None:
        super().__init__()
        self.factors = upsample_factors(scale)
        self.body = _residual_blocks(num_feat, num_blocks)
        self.conv_body = nn.Conv2d(num_feat, num_feat, 3, 1, 1)
        convs = [nn.Conv2d(num_feat, num_feat * r * r, 3, 1, 1) for r in self.factors[:-1]]
        convs.append(nn.Conv2d(num_feat, out_channels * self.factors[-1] ** 2, 3, 1, 1))
        self.upsample = nn.ModuleList(convs)
        _scale_last(convs[-1])

    def forward(self, feat: Tensor) -> Tensor:
        x = conv2d_fused(self.body(feat), self.conv_body, residual=feat)
        for conv, r in zip(self.upsample[:-1], self.factors[:-1], strict=True):
            # ReLU commutes with the pixel shuffle (a permutation), so it is fused into the conv.
            x = _compute_layout(F.pixel_shuffle(conv2d_fused(x, conv, "relu"), r))
        return F.pixel_shuffle(self.upsample[-1](x), self.factors[-1])


class ReconstructionDecoder(nn.Module):
    """``D_rec``: ``E_f`` features of the HR image back to the HR image (Eq. 7).

    conv-ReLU-conv to ``out_channels * scale^2`` channels, pixel-shuffle(scale).

    Shape:
        (B, num_feat, h, w) -> (B, out_channels, h * scale, w * scale).
    """

    def __init__(self, scale: int, num_feat: int, out_channels: int = 3) -> None:
        super().__init__()
        self.scale = scale
        self.conv1 = nn.Conv2d(num_feat, num_feat, 3, 1, 1)
        self.conv2 = nn.Conv2d(num_feat, out_channels * scale * scale, 3, 1, 1)

    def forward(self, feat: Tensor) -> Tensor:
        return F.pixel_shuffle(self.conv2(F.relu(self.conv1(feat))), self.scale)


class ProjectionHead(nn.Sequential):
    """The two-layer MLP (Linear-ReLU-Linear, as in SimCLR) to ``S``-d L2-normalised embeddings.

    The hidden layer has ``S`` units (the paper does not give its width).

    Shape:
        (..., in_dim) -> (..., out_dim), unit L2 norm along the last axis.
    """

    def __init__(self, in_dim: int, out_dim: int = 256) -> None:
        super().__init__(nn.Linear(in_dim, out_dim), nn.ReLU(inplace=True), nn.Linear(out_dim, out_dim))

    def forward(self, x: Tensor) -> Tensor:
        return F.normalize(super().forward(x).float(), dim=-1)


class CRLSR(nn.Module):
    """CRL-SR: the LR branch for inference plus, when ``training_parts``, the parts only training needs.

    Args:
        scale, num_feat, enc_blocks, ref_blocks, proj_dim, ef_feat, ef_blocks: see :class:`CRLSRConfig`.
        training_parts: build ``Ē_h``, the MLP heads, ``E_f`` and ``D_rec`` (False: an inference model,
            whose state dict holds only ``encoder_lr.`` and ``refine.`` keys).
        losses: loss settings used by :meth:`training_losses` (default :class:`CRLSRLossConfig`).
    """

    def __init__(
        self,
        scale: int = 4,
        num_feat: int = 64,
        enc_blocks: int = 8,
        ref_blocks: int = 8,
        proj_dim: int = 256,
        ef_feat: int = 64,
        ef_blocks: int = 2,
        *,
        training_parts: bool = True,
        losses: CRLSRLossConfig | None = None,
    ) -> None:
        super().__init__()
        self.config = CRLSRConfig(scale, num_feat, enc_blocks, ref_blocks, proj_dim, ef_feat, ef_blocks)
        self.scale = scale
        self.loss_config = losses or CRLSRLossConfig()
        self.has_training_parts = training_parts
        # Ē_l and D_ref: the inference path.
        self.encoder_lr = UnshuffleEncoder(scale, num_feat, enc_blocks)
        self.refine = RefinementDecoder(scale, num_feat, ref_blocks)
        if training_parts:
            self.encoder_hr = UnshuffleEncoder(scale, num_feat, enc_blocks)  # Ē_h
            self.proj_lr = ProjectionHead(num_feat, proj_dim)
            self.proj_hr = ProjectionHead(num_feat, proj_dim)
            self.feat_extractor = UnshuffleEncoder(scale, ef_feat, ef_blocks)  # E_f
            self.proj_feat = ProjectionHead(ef_feat, proj_dim)
            self.decoder_rec = ReconstructionDecoder(scale, ef_feat)  # D_rec

    @classmethod
    def from_config(cls, config: CRLSRConfig | dict[str, Any], **kwargs: Any) -> CRLSR:
        """Build from a :class:`CRLSRConfig` or its dict (``kwargs``: ``training_parts``, ``losses``)."""
        cfg = config.to_dict() if isinstance(config, CRLSRConfig) else dict(config)
        return cls(**cfg, **kwargs)

    def inference_state_dict(self) -> dict[str, Tensor]:
        """Only the tensors inference needs (``encoder_lr.``, ``refine.``), e.g. to ship a trained model."""
        return {k: v for k, v in self.state_dict().items() if k.startswith(INFERENCE_PREFIXES)}

    # ------------------------------------------------------------------ inference
    def _super_resolve(self, lr: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """``(U_l, f̄_l, I_s)`` for an LR batch (B, 3, h, w)."""
        u = bicubic_upsample(lr, self.scale)
        f_l = self.encoder_lr(u)
        return u, f_l, u + self.refine(f_l)

    def forward(self, lr: Tensor) -> Tensor:
        """Super-resolve with the LR branch only (``Ē_l`` and ``D_ref``).

        Args:
            lr: (B, 3, h, w) in [0, 1].

        Returns:
            I_s: (B, 3, h * scale, w * scale), not clamped, contiguous NCHW.
        """
        return self._super_resolve(lr)[2].contiguous()

    # ------------------------------------------------------------------ training
    def training_losses(
        self,
        lr: Tensor,
        hr: Tensor,
        *,
        contrastive: bool = True,
        generator: torch.Generator | None = None,
    ) -> dict[str, Tensor]:
        """Every loss term of one training batch, and their weighted sum.

        Args:
            lr: (B, 3, h, w) degraded LR images in [0, 1].
            hr: (B, 3, h * scale, w * scale) HR images in [0, 1].
            contrastive: False trains the paper's Table 1 model (a): ``Ē_l`` + ``D_ref`` with the L1 SR
                loss only (the training-only parts are not used and need not exist).
            generator: CPU generator for the positions of the contrastive losses (``None``: torch's
                default generator).

        Returns:
            ``{"rec_sr": L_rec^sr, "total": ...}`` when not ``contrastive``; otherwise also ``"bc"``
            (Eq. 3), ``"srnce"`` (Eq. 6) and ``"rec_hr"`` (Eq. 7).  Scalar float32 tensors;
            ``total`` is the weighted sum (:class:`CRLSRLossConfig`).
        """
        if lr.dim() != 4 or hr.dim() != 4 or lr.shape[:2] != hr.shape[:2] or tuple(hr.shape[-2:]) != (
            lr.shape[-2] * self.scale,
            lr.shape[-1] * self.scale,
        ):
            raise ValueError(
                f"expected lr (B, 3, h, w) and hr (B, 3, {self.scale}h, {self.scale}w), "
                f"got {tuple(lr.shape)} and {tuple(hr.shape)}"
            )
        cfg = self.loss_config
        u, f_l, sr = self._super_resolve(lr)
        losses = {"rec_sr": reconstruction_loss(sr, hr)}
        if not contrastive:
            losses["total"] = cfg.weight_rec_sr * losses["rec_sr"]
            return losses
        if not self.has_training_parts:
            raise RuntimeError("this CRL-SR model was built without its training parts (training_parts=False)")

        # Contrastive decoupling encoding: the same sampled positions in Ē_l's and Ē_h's LR-grid maps.
        f_h_bar = self.encoder_hr(hr)
        b, _, h, w = f_l.shape
        index = sample_positions(b, h, w, cfg.num_samples, generator=generator)
        z_l = self.proj_lr(gather_positions(f_l, index))
        z_h = self.proj_hr(gather_positions(f_h_bar, index))
        losses["bc"] = bidirectional_contrastive_loss(z_h, z_l, cfg.tau)

        # Contrastive feature refinement.
        f_h, (q_h, q_s, q_l) = self.refinement_embeddings(u, sr, hr, index)
        losses["rec_hr"] = reconstruction_loss(self.decoder_rec(f_h), hr)
        if cfg.srnce == "conditional":
            losses["srnce"] = conditional_contrastive_loss(q_h, q_s, q_l, tau=cfg.srnce_tau)
        else:
            losses["srnce"] = contrastive_loss(q_h, q_s, cfg.srnce_tau)

        losses["total"] = (
            cfg.weight_rec_sr * losses["rec_sr"]
            + cfg.weight_bc * losses["bc"]
            + cfg.weight_srnce * losses["srnce"]
            + cfg.weight_rec_hr * losses["rec_hr"]
        )
        return losses

    def refinement_embeddings(
        self, u: Tensor, sr: Tensor, hr: Tensor, index: Tensor
    ) -> tuple[Tensor, tuple[Tensor, Tensor, Tensor]]:
        """``E_f``'s features of ``I_h`` and the three embeddings that enter ``L_SRNCE`` (Eqs. 4-6).

        Args:
            u: (B, 3, H, W) ``U_l``, the bicubic-upsampled LR image.
            sr: (B, 3, H, W) ``I_s``.
            hr: (B, 3, H, W) ``I_h``.
            index: (B, M) flat LR-grid positions (:func:`~.losses.sample_positions`).

        Returns:
            ``(f_h, (q_h, q_s, q_l))``: ``f_h`` (B, ef_feat, H / s, W / s) for ``D_rec``; the L2-normalised
            (B, M, S) embeddings of ``I_h``, ``I_s`` and ``U_l``.  ``q_l`` is the condition of Eq. (6), in the
            same space as the other two (``E_f``, ``proj_feat``) and a constant (see losses.py for this
            reading and why).
        """
        b = hr.shape[0]
        feats = self.feat_extractor(torch.cat([hr, sr.to(hr.dtype)]))  # both images in one call
        f_h, f_s = feats[:b], feats[b:]
        q_h = self.proj_feat(gather_positions(f_h, index))
        q_s = self.proj_feat(gather_positions(f_s, index))
        with torch.no_grad():
            q_l = self.proj_feat(gather_positions(self.feat_extractor(u), index))
        return f_h, (q_h, q_s, q_l)


def _compute_layout(x: Tensor) -> Tensor:
    # oneDNN convolutions on CPU run natively on NHWC (and the residual blocks' fused path needs it).
    if x.device.type == "cpu" and x.dim() == 4:
        return x.contiguous(memory_format=torch.channels_last)
    return x
