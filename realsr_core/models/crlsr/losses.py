"""CRL-SR training losses: Eqs. (2)-(8) of the paper, as functions of embedding and image tensors.

Paper: J. Zhang, S. Lu, F. Zhan, Y. Yu, "Blind Image Super-Resolution via Contrastive Representation
Learning", arXiv 2107.00708 (2021), Sections 3.3-3.4.

Notation (the paper's): for one image, ``M`` feature vectors sit at ``M`` spatial positions; ``f̄_l^m`` and
``f̄_h^m`` are the resolution-invariant features of the upsampled LR image ``U_l`` and of the HR image
``I_h`` (contrastive decoupling encoding), ``f_h^m`` and ``f_s^m`` the features ``E_f`` extracts from
``I_h`` and from the SR image ``I_s`` (contrastive feature refinement); in Eqs. (4)-(6) ``f̄_l^m`` is the
condition, the features of ``U_l`` in the space of ``f_h`` and ``f_s`` (see "Condition space").  Every
vector entering a contrastive loss is an L2-normalised ``S``-dimensional embedding (the paper's
two-layer MLP, S = 256), so all dot products lie in [-1, 1].

Our readings where the text leaves a choice (documented once here, used by :class:`CRLSR`):

* Reduction.  Eq. (2) sums over the ``M`` positions, Eqs. (4) and (6) average over them.  Every
  contrastive loss here averages over positions and over the batch, so that no term grows with the
  number of positions sampled and the unit weights of Eq. (8) stay balanced against the L1 terms
  (the paper's sum is ``M`` times our mean).
* Temperature.  Eq. (2) divides the dot products by ``tau`` (0.07, Section 4.1); Eqs. (4)-(6) are written
  without it and with the constant ``1`` of the pushing term on the same scale as a dot product, so
  :func:`conditional_contrastive_loss` uses ``tau = 1`` by default (an option divides every exponent).
* Penalty.  Eq. (5): ``p_m = h(f_h^m . f̄_l^m) = 1 - f_h^m . f̄_l^m``.  For unit vectors this is
  ``||f_h^m - f̄_l^m||^2 / 2``: 0 when the HR feature equals the LR one (nothing lost), 1 when
  orthogonal, 2 when opposite -- it grows with their distance, as the text requires.
  Subtracting it from the two positive exponents of Eq. (6) lowers the positives' share of the
  denominator, so positions that lost more detail get a larger loss and larger gradients (the text's
  "enhanced" pulling and pushing forces); with ``p_m = 0`` Eq. (6) is Eq. (4).
* Condition space.  Eqs. (4)-(6) take dot products of ``f̄_l^m`` with ``f_s^m`` and ``f_h^m``, so the three
  must live in one embedding space, and the text names them "the features of ``U_l``, ``I_h`` and ``I_s``"
  (Fig. 2a extracts all three).  :class:`CRLSR` therefore embeds ``U_l`` (the input of ``Ē_l``) with the
  same ``E_f`` and MLP head as ``I_h`` and ``I_s``; ``p_m`` is then the distance between the HR and the
  upsampled-LR features at ``m``, i.e. how much detail was lost there, as the text motivates it.  Two
  other readings were measured and rejected (small x4 model, 4 real photo crops, Adam 1e-3, 40 steps,
  5 seeds, L_bc weighted 0.01 to isolate L_SRNCE): taking ``Ē_l``'s L_bc embedding (another head's space,
  which nothing aligns with ``E_f``'s) the SR L1 diverged in 1 of 5 seeds (0.028 -> 0.18), taking
  ``Ē_l``'s features through ``E_f``'s head in 4 of 5 (up to 0.41): the pushing term could be lowered by
  moving ``I_s`` away from an unrelated vector in any direction.  With the ``U_l`` features the SR L1
  fell in 5 of 5 (also with L_bc weighted 1 and 0.1).
* Stop-gradient.  ``f̄_l`` is the *condition* of Eq. (6) and ``p_m`` a weighting factor: both are treated
  as constants here (callers pass a detached ``f̄_l``; the penalty is always detached).  Letting the
  gradient through ``p_m`` would lower the loss by pulling ``f_h`` towards ``f̄_l``, i.e. by removing the
  very high-frequency content Eq. (7) asks ``f_h`` to keep.
* Degenerate optimum (measured, not a reading).  At tau = 1 the pushing term is worth up to ``e^2``, the
  pulling one at most ``e^1``, so Eq. (6) is lower for an embedding that maps every HR and ``U_l`` patch
  to one vector ``v`` and every SR patch to ``-v`` (``log(1 + (M - 1) / (1 + e^3))``, 2.572 for M = 256)
  than for the ideal one where ``f_s = f_h`` and positions are orthonormal (``log(1 + (M - 1) / (1 + e))``,
  4.24).  ``E_f`` and its head then act as a real-vs-SR discriminator and the loss's gradient on ``I_s``
  points against the L1's.  Our shipped run fell into that state between steps 3,000 and 4,000 (L_SRNCE
  4.58 -> 3.00; ``bench/crlsr_gradients.py``).
* L1.  ``||I_h - I_s||_1`` and Eq. (7) are taken as the mean absolute error over all elements.
* Positions.  The losses take the ``M`` vectors as given; :class:`CRLSR` draws a random subset of at most
  ``num_samples`` positions per image (same positions for every feature map of that image), which
  bounds the ``M x M`` similarity matrices; the other sampled positions of the same image are the
  negatives, as in the paper.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "bidirectional_contrastive_loss",
    "conditional_contrastive_loss",
    "contrastive_loss",
    "gather_positions",
    "reconstruction_loss",
    "sample_positions",
    "srnce_penalty",
]

TAU = 0.07  # Section 4.1, "as in [4]" (SimCLR)


def _check_embeddings(*tensors: Tensor) -> None:
    shape = tensors[0].shape
    if tensors[0].dim() != 3:
        raise ValueError(f"embeddings must be (B, M, S), got {tuple(shape)}")
    for t in tensors[1:]:
        if t.shape != shape:
            raise ValueError(f"embedding shapes differ: {tuple(shape)} and {tuple(t.shape)}")


def contrastive_loss(anchor: Tensor, samples: Tensor, tau: float = TAU) -> Tensor:
    """``L_c(anchor, samples)`` of Eq. (2): InfoNCE with the other positions of the same image as negatives.

    For each image and position ``m``, ``anchor^m`` is the anchor, ``samples^m`` its positive and the
    ``M - 1`` other ``samples^j`` its negatives:
    ``-log( exp(a^m . s^m / tau) / sum_j exp(a^m . s^j / tau) )``, averaged over positions and images.

    Args:
        anchor: (B, M, S) L2-normalised embeddings (``f̄_h`` for the first term of Eq. 3).
        samples: (B, M, S) L2-normalised embeddings at the same positions (``f̄_l``).
        tau: temperature.

    Returns:
        scalar tensor >= 0 (``log M`` for embeddings that carry no position information), float32.
    """
    _check_embeddings(anchor, samples)
    logits = torch.bmm(anchor.float(), samples.float().transpose(1, 2)) / tau  # (B, M, M): [b, m, j] = a^m . s^j
    target = torch.arange(anchor.shape[1], device=anchor.device).expand(anchor.shape[0], -1)
    return F.cross_entropy(logits.flatten(0, 1), target.flatten())


def bidirectional_contrastive_loss(f_h_bar: Tensor, f_l_bar: Tensor, tau: float = TAU) -> Tensor:
    """``L_bc = L_c(f̄_h, f̄_l) + L_c(f̄_l, f̄_h)`` (Eq. 3): each encoder's embedding is anchor once.

    Args:
        f_h_bar: (B, M, S) L2-normalised embeddings of the HR encoder ``Ē_h``.
        f_l_bar: (B, M, S) L2-normalised embeddings of the LR encoder ``Ē_l`` at the same positions.
        tau: temperature (0.07 in the paper).

    Returns:
        scalar float32 tensor >= 0.
    """
    return contrastive_loss(f_h_bar, f_l_bar, tau) + contrastive_loss(f_l_bar, f_h_bar, tau)


def srnce_penalty(f_h: Tensor, f_l_bar: Tensor) -> Tensor:
    """The penalty ``p_m = 1 - f_h^m . f̄_l^m`` of Eq. (5), detached.

    Args:
        f_h: (B, M, S) L2-normalised ``E_f`` embeddings of the HR image.
        f_l_bar: (B, M, S) L2-normalised embeddings of the upsampled LR image at the same positions.

    Returns:
        (B, M) float32 in [0, 2] (``||f_h^m - f̄_l^m||^2 / 2``): larger where more detail was lost.
    """
    _check_embeddings(f_h, f_l_bar)
    return (1.0 - (f_h.float() * f_l_bar.float()).sum(-1)).detach()


def conditional_contrastive_loss(
    f_h: Tensor, f_s: Tensor, f_l_bar: Tensor, *, penalty: bool = True, tau: float = 1.0
) -> Tensor:
    """The conditional contrastive loss ``L_SRNCE`` of Eq. (6) (Eq. 4 with ``penalty=False``).

    For position ``m`` of an image, with ``p_m`` from :func:`srnce_penalty` (0 when ``penalty`` is False)::

        pos_m = exp(f_h^m . f_s^m - p_m) + exp(1 - f_s^m . f̄_l^m - p_m)
        loss_m = -log( pos_m / (pos_m + sum_{j != m} exp(f_h^m . f_s^j)) )

    The first positive term pulls ``f_s^m`` towards the anchor ``f_h^m``, the second pushes it away from
    the condition ``f̄_l^m``; the negatives are the SR embeddings at the other positions.  Computed in
    log space (log-sum-exp), averaged over positions and images.

    Args:
        f_h: (B, M, S) L2-normalised ``E_f(I_h)`` embeddings (anchors).
        f_s: (B, M, S) L2-normalised ``E_f(I_s)`` embeddings (positives and negatives).
        f_l_bar: (B, M, S) L2-normalised embeddings of the upsampled LR image in the same space (the
            condition); pass it detached (see the module docstring).
        penalty: apply Eq. (5)'s ``p_m`` (Eq. 6) or not (Eq. 4).
        tau: divides every exponent; 1 reproduces the equations as written.

    Returns:
        scalar float32 tensor >= 0.
    """
    _check_embeddings(f_h, f_s, f_l_bar)
    f_h, f_s, f_l_bar = f_h.float(), f_s.float(), f_l_bar.float()
    m = f_h.shape[1]
    sim = torch.bmm(f_h, f_s.transpose(1, 2))  # (B, M, M): [b, m, j] = f_h^m . f_s^j
    pull = sim.diagonal(dim1=1, dim2=2)  # f_h^m . f_s^m
    push = 1.0 - (f_s * f_l_bar).sum(-1)  # 1 - f_s^m . f̄_l^m
    p = srnce_penalty(f_h, f_l_bar) if penalty else torch.zeros_like(pull)
    log_pos = torch.logaddexp((pull - p) / tau, (push - p) / tau)  # (B, M)
    eye = torch.eye(m, dtype=torch.bool, device=sim.device)
    negatives = (sim / tau).masked_fill(eye, float("-inf"))  # j != m only
    log_den = torch.logsumexp(torch.cat([log_pos.unsqueeze(-1), negatives], -1), -1)
    return (log_den - log_pos).mean()


def reconstruction_loss(pred: Tensor, target: Tensor) -> Tensor:
    """Mean absolute error, the paper's L1 terms ``L_rec^sr = ||I_h - I_s||`` and ``L_rec^hr`` (Eq. 7).

    Args:
        pred: (B, C, H, W) reconstruction.
        target: (B, C, H, W) the HR image, [0, 1].

    Returns:
        scalar float32 tensor.
    """
    if pred.shape != target.shape:
        raise ValueError(f"reconstruction {tuple(pred.shape)} and target {tuple(target.shape)} differ in shape")
    return F.l1_loss(pred.float(), target.float())


def sample_positions(
    batch: int, height: int, width: int, num: int, *, generator: torch.Generator | None = None
) -> Tensor:
    """Draw ``min(num, height * width)`` distinct positions per image, independently for each image.

    Args:
        batch, height, width: size of the feature grid.
        num: positions wanted per image (the ``M`` of the losses).
        generator: CPU generator the draw comes from (``None``: torch's default CPU generator).

    Returns:
        (B, M) int64 flat indices ``y * width + x`` on the CPU, each row without repeats.
    """
    if num < 1:
        raise ValueError(f"num must be >= 1, got {num}")
    n = height * width
    k = min(num, n)
    if k == n:  # every position: no draw, so the generator's state is left as is
        return torch.arange(n).expand(batch, -1).clone()
    return torch.rand(batch, n, generator=generator).argsort(dim=1)[:, :k]


def gather_positions(feat: Tensor, index: Tensor) -> Tensor:
    """The feature vectors of a map at given positions.

    Args:
        feat: (B, C, H, W) features.
        index: (B, M) int64 flat indices ``y * W + x`` (any device; moved to ``feat``'s).

    Returns:
        (B, M, C) vectors, differentiable with respect to ``feat``.
    """
    b, c = feat.shape[:2]
    idx = index.to(feat.device)[:, None, :].expand(b, c, -1)
    return feat.flatten(2).gather(2, idx).transpose(1, 2)
