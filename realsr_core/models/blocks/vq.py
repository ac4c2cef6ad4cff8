"""Nearest-codebook vector quantisation (VQ-VAE / VQGAN inference).

The search always runs in float32, whatever the model's dtype: squared distances over hundreds of
channels are large numbers whose best-vs-second-best margins are small, and float16/bfloat16 rounding
would flip codes.  The codes are then gathered (no one-hot matrix product) in the input's dtype.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import Tensor, nn

__all__ = ["VectorQuantizer", "nearest_code"]

# Distance-matrix elements computed at once (float32: 16 MiB), which bounds the search's memory.
_CHUNK_ELEMENTS = 1 << 22


@contextmanager
def _ieee_float32_matmul(device: torch.device) -> Iterator[None]:
    """Keep the search's float32 matmuls in float32: outside any autocast region of the caller (mixed-precision
    LWay fine-tuning would run ``addmm`` in bfloat16 / float16 and pick other codes), and without TF32 on CUDA
    (hosts may enable it globally)."""
    with torch.autocast(device.type, enabled=False):
        if device.type != "cuda":
            yield
            return
        prev = torch.backends.cuda.matmul.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = False
        try:
            yield
        finally:
            torch.backends.cuda.matmul.allow_tf32 = prev


def nearest_code(z: Tensor, codebook: Tensor, chunk_elements: int = _CHUNK_ELEMENTS) -> Tensor:
    """Index of the closest codebook entry (squared Euclidean distance) for every vector.

    The distance ``|z|^2 + |e|^2 - 2 z.e`` is minimised over ``e`` as ``|e|^2 - 2 z.e``: ``|z|^2`` is the
    same for every code, so leaving it out changes no argmin and saves a rounding step.

    Args:
        z: (N, D) vectors, any floating dtype (searched in float32).
        codebook: (K, D) code vectors, any floating dtype (searched in float32).
        chunk_elements: at most this many distances are held at once (rows are processed in chunks).

    Returns:
        (N,) int64 indices in [0, K).
    """
    if z.dim() != 2 or codebook.dim() != 2 or z.shape[1] != codebook.shape[1]:
        raise ValueError(f"expected z (N, D) and codebook (K, D), got {tuple(z.shape)} and {tuple(codebook.shape)}")
    e = codebook.float()
    e_sq = e.square().sum(1)  # (K,)
    e_t = e.t()
    rows = max(1, chunk_elements // max(1, e.shape[0]))
    out = torch.empty(z.shape[0], dtype=torch.long, device=z.device)
    with _ieee_float32_matmul(z.device):
        for start in range(0, z.shape[0], rows):
            zc = z[start : start + rows].float()
            d = torch.addmm(e_sq, zc, e_t, beta=1.0, alpha=-2.0)  # (rows, K)
            torch.argmin(d, dim=1, out=out[start : start + rows])
    return out


class VectorQuantizer(nn.Module):
    """Replace every feature vector by its nearest codebook entry.

    Args:
        n_e: codebook size ``K``.
        e_dim: code dimension ``D`` (the channels of the quantised map).

    The codebook is ``embedding.weight`` (K, D), as in VQGAN/FeMaSR checkpoints.
    """

    def __init__(self, n_e: int, e_dim: int) -> None:
        super().__init__()
        self.n_e = n_e
        self.e_dim = e_dim
        # VQGAN's init; passing the weight skips nn.Embedding's normal_ init, which on the meta device
        # (used when loading) goes through a slow reference path
        self.embedding = nn.Embedding(n_e, e_dim, _weight=torch.empty(n_e, e_dim).uniform_(-1.0 / n_e, 1.0 / n_e))

    def forward(self, z: Tensor) -> tuple[Tensor, Tensor]:
        """Quantise a feature map.

        Args:
            z: (B, D, H, W) features, any floating dtype.

        Returns:
            z_q: (B, D, H, W) codes in ``z``'s dtype and memory format.
            indices: (B, 1, H, W) int64 code indices.
        """
        b, d, h, w = z.shape
        if d != self.e_dim:
            raise ValueError(f"expected {self.e_dim} channels, got {d}")
        flat = z.permute(0, 2, 3, 1).reshape(-1, d)  # free when z is channels_last
        idx = nearest_code(flat, self.embedding.weight)
        z_q = self.embedding.weight.index_select(0, idx).to(z.dtype).view(b, h, w, d).permute(0, 3, 1, 2)
        if not z.is_contiguous(memory_format=torch.channels_last):
            z_q = z_q.contiguous()
        return z_q, idx.view(b, 1, h, w)
