"""Swin Transformer layers as used by SwinIR: window attention, shifted windows and the RSTB.

Key names follow SwinIR (``residual_group.blocks.{j}.norm1``, ``attn.qkv``, ``attn.proj``,
``attn.relative_position_bias_table``, buffers ``attn.relative_position_index`` and ``attn_mask``,
``mlp.fc1``, ``mlp.fc2``, ``conv``); the patch embed/unembed of SwinIR have no parameters and are
plain reshapes here.

How the tokens are laid out.  A block's math only needs the tokens of one window to be consecutive:
layer norms, linear layers and the MLP act per token.  So instead of rolling, partitioning and
reversing the feature map in every block (four copies for a shifted block), the tokens are kept in
*window order* for the whole residual group and moved from one block's window order to the next
block's with a single row gather (``index_select``).  Attention is one
``scaled_dot_product_attention`` call per block.  With a cyclic shift ``s`` only the windows of the last
window row or column mix pixels from opposite borders, so SwinIR's per-window mask has just four
patterns (none, column split, row split, both): the (windows, heads, N, N) bias+mask of a shifted block
is gathered from the four patterns plus the relative-position bias (2 KiB per latent pixel in float32).
The result equals SwinIR's roll + ``window_partition`` + mask exactly (``shifted_window_mask`` is
SwinIR's own mask computation, kept for the stored buffers and for checking).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import lru_cache

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .gn_resblock import Conv2d, compute_in_float32
from .rrdb import conv2d_fused

__all__ = [
    "RSTB",
    "BasicLayer",
    "Mlp",
    "SwinTransformerBlock",
    "WindowAttention",
    "WindowPlan",
    "relative_position_index",
    "shifted_window_mask",
    "window_plan",
]

_MASK_VALUE = -100.0  # SwinIR's additive mask value (not -inf)


def relative_position_index(window_size: int) -> Tensor:
    """Index into the relative-position bias table for every (query, key) pair of a window.

    Args:
        window_size: window side ``ws``.

    Returns:
        (ws*ws, ws*ws) int64 in [0, (2*ws-1)**2); row-major token order inside the window.
    """
    ws = window_size
    r = torch.arange(ws, device="cpu")  # explicit device: cheap CPU math even under a meta-device context
    ys, xs = torch.meshgrid(r, r, indexing="ij")
    coords = torch.stack((ys.flatten(), xs.flatten()))  # (2, N)
    rel = coords[:, :, None] - coords[:, None, :] + (ws - 1)  # (2, N, N), each in [0, 2ws-2]
    return rel[0] * (2 * ws - 1) + rel[1]


def _region_labels(size: int, window_size: int, shift: int) -> Tensor:
    """SwinIR's region id of every row (or column) of the rolled map: 0 / 1 / 2 for the slices
    ``[0, size-ws)``, ``[size-ws, size-shift)``, ``[size-shift, size)``."""
    labels = torch.zeros(size, dtype=torch.long, device="cpu")
    labels[size - window_size :] = 1
    labels[size - shift :] = 2
    return labels


def shifted_window_mask(height: int, width: int, window_size: int, shift: int) -> Tensor:
    """SwinIR's attention mask of a shifted-window block, for every window of one image.

    Args:
        height, width: feature-map size, multiples of ``window_size``.
        window_size: window side ``ws``.
        shift: cyclic shift ``s`` (0 < s < ws).

    Returns:
        (nW, ws*ws, ws*ws) float32, 0 where query and key come from the same region of the rolled map,
        -100 elsewhere; windows in row-major order.
    """
    ws = window_size
    rows = _region_labels(height, ws, shift)
    cols = _region_labels(width, ws, shift)
    labels = rows[:, None] * 3 + cols[None, :]  # (H, W)
    labels = labels.view(height // ws, ws, width // ws, ws).permute(0, 2, 1, 3).reshape(-1, ws * ws)
    diff = labels[:, :, None] != labels[:, None, :]
    return torch.zeros(diff.shape, device="cpu").masked_fill_(diff, _MASK_VALUE)


@dataclass
class WindowPlan:
    """Token orders of one feature-map size: where each windowed token comes from.

    Attributes:
        window_size: window side ``ws``; a window holds ``N = ws*ws`` consecutive tokens.
        perm: per shift ``s`` (0 = plain windows), (B*H*W,) int64 raster index of the token at each
            window-order position: windows of the map rolled by ``-s``, in (batch, row, column) order.
        patterns: per shift, (4, N, N) float32 additive masks with SwinIR's values (0 / -100) for
            windows inside the map, on the last column, on the last row, in the corner; None for s = 0.
        mask_index: per shift > 0, (B*nW,) int64 pattern of each window.
    """

    window_size: int
    perm: dict[int, Tensor]
    patterns: dict[int, Tensor | None]
    mask_index: dict[int, Tensor]
    _inverse: dict[int, Tensor] = field(default_factory=dict)
    _moves: dict[tuple[int | None, int | None], Tensor] = field(default_factory=dict)

    def inverse(self, order: int) -> Tensor:
        """(B*H*W,) window-order position of each raster token."""
        if order not in self._inverse:
            perm = self.perm[order]
            inv = torch.empty_like(perm)
            inv[perm] = torch.arange(perm.numel(), device=perm.device)
            self._inverse[order] = inv
        return self._inverse[order]

    def move(self, src: int | None, dst: int | None) -> Tensor:
        """Gather index turning tokens in order ``src`` into order ``dst`` (``None`` = raster)."""
        key = (src, dst)
        if key not in self._moves:
            if src is None:
                idx = self.perm[dst]  # type: ignore[index]
            elif dst is None:
                idx = self.inverse(src)
            else:
                idx = self.inverse(src)[self.perm[dst]]
            self._moves[key] = idx
        return self._moves[key]


def _order(batch: int, height: int, width: int, ws: int, shift: int) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """Window order of the map rolled by ``-shift``: (perm, mask patterns, pattern of each window)."""
    nwh, nww, n = height // ws, width // ws, ws * ws
    r = torch.arange(nwh).view(nwh, 1, 1, 1)
    c = torch.arange(nww).view(1, nww, 1, 1)
    i = torch.arange(ws).view(1, 1, ws, 1)
    j = torch.arange(ws).view(1, 1, 1, ws)
    # torch.roll(x, -shift) reads x[(y + shift) % H] at position y
    src = ((r * ws + i + shift) % height) * width + (c * ws + j + shift) % width  # (nwh, nww, ws, ws)
    perm = (torch.arange(batch).view(batch, 1) * (height * width) + src.reshape(1, -1)).flatten()
    if shift == 0:
        return perm, None, None
    # SwinIR labels rows [0, H-ws), [H-ws, H-s), [H-s, H) of the rolled map 0, 1, 2 (same for columns):
    # a window off the last row/column sees label 0 only; on it, its last s rows/columns differ.
    split = _region_labels(ws, ws, shift)  # (ws,) 1 then 2: the labels inside a last-row window
    flat = torch.zeros(ws, dtype=torch.long)
    masks = []
    for rows, cols in ((flat, flat), (flat, split), (split, flat), (split, split)):
        labels = (rows[:, None] * 3 + cols[None, :]).flatten()
        masks.append(torch.zeros(n, n).masked_fill_(labels[:, None] != labels[None, :], _MASK_VALUE))
    last_row = (torch.arange(nwh) == nwh - 1).long().view(nwh, 1)
    last_col = (torch.arange(nww) == nww - 1).long().view(1, nww)
    pattern = (2 * last_row + last_col).flatten().repeat(batch)
    return perm, torch.stack(masks), pattern


def window_plan(
    batch: int, height: int, width: int, window_size: int, shifts: tuple[int, ...], device: torch.device
) -> WindowPlan:
    """The token orders of a (batch, height, width) feature map, cached per size and device.

    Args:
        batch, height, width: map size; ``height`` and ``width`` multiples of ``window_size``.
        window_size: window side.
        shifts: the cyclic shifts used by the blocks (0 for plain windows).
        device: where the index tensors live.
    """
    # Keyed by inference mode too: index tensors made under inference_mode cannot be saved for backward,
    # so a plan cached by an inference run must not serve a later fine-tuning (LWay) run.
    return _window_plan(batch, height, width, window_size, shifts, device, torch.is_inference_mode_enabled())


@lru_cache(maxsize=8)
def _window_plan(
    batch: int, height: int, width: int, window_size: int, shifts: tuple[int, ...], device: torch.device,
    inference: bool,
) -> WindowPlan:
    perm: dict[int, Tensor] = {}
    patterns: dict[int, Tensor | None] = {}
    mask_index: dict[int, Tensor] = {}
    for s in shifts:
        p, pat, idx = _order(batch, height, width, window_size, s)
        perm[s] = p.to(device)
        patterns[s] = None if pat is None else pat.to(device)
        if idx is not None:
            mask_index[s] = idx.to(device)
    return WindowPlan(window_size, perm, patterns, mask_index)


def _linear(x: Tensor, layer: nn.Linear) -> Tensor:
    """``layer(x)``, computed in float32 for half-precision CPU inputs without native kernels."""
    if compute_in_float32(x):
        b = None if layer.bias is None else layer.bias.float()
        return F.linear(x.float(), layer.weight.float(), b).to(x.dtype)
    return F.linear(x, layer.weight, layer.bias)


class WindowAttention(nn.Module):
    """Multi-head self-attention inside windows with a learned relative-position bias (Swin / SwinIR).

    Args:
        dim: token channels ``C``.
        window_size: window side ``ws`` (``N = ws*ws`` tokens per window).
        num_heads: attention heads; ``C`` must be divisible by it.
        qkv_bias: whether the qkv projection has a bias.
    """

    def __init__(self, dim: int, window_size: int, num_heads: int, qkv_bias: bool = True) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} is not divisible by num_heads {num_heads}")
        self.dim = dim
        self.window_size = window_size
        self.num_heads = num_heads
        self.relative_position_bias_table = nn.Parameter(torch.zeros((2 * window_size - 1) ** 2, num_heads))
        self.register_buffer("relative_position_index", relative_position_index(window_size))
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def position_bias(self) -> Tensor:
        """(1, heads, N, N) relative-position bias, contiguous, in the table's dtype."""
        n = self.window_size**2
        # gathering columns of the transposed table yields the (heads, N*N) layout in one copy
        bias = self.relative_position_bias_table.t()[:, self.relative_position_index.reshape(-1)]
        return bias.view(1, self.num_heads, n, n)

    def forward(self, x: Tensor, patterns: Tensor | None = None, mask_index: Tensor | None = None) -> Tensor:
        """Attend within windows.

        Args:
            x: (nW, N, C) tokens, one window per row.
            patterns: (P, N, N) additive masks (SwinIR: 0 / -100), or None for no mask.
            mask_index: (nW,) int64 pattern of each window (with ``patterns``).

        Returns:
            (nW, N, C).
        """
        nw, n, c = x.shape
        heads = self.num_heads
        qkv = _linear(x, self.qkv).view(nw, n, 3, heads, c // heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each (nW, heads, N, hd), strided views
        bias = self.position_bias().to(x.dtype)
        if patterns is not None and mask_index is not None:
            # (P, heads, N, N) bias+mask per pattern, gathered to (nW, heads, N, N)
            bias = (bias + patterns.to(x.dtype).unsqueeze(1)).index_select(0, mask_index)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
        return _linear(out.transpose(1, 2).reshape(nw, n, c), self.proj)


class Mlp(nn.Module):
    """Token MLP: ``fc2(gelu(fc1(x)))`` (exact erf GELU).

    Args:
        dim: input and output channels.
        hidden: hidden channels.
    """

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        return _linear(self.act(_linear(x, self.fc1)), self.fc2)


class SwinTransformerBlock(nn.Module):
    """Pre-norm Swin block: ``x + attn(norm1(x))`` then ``x + mlp(norm2(x))``, on windowed tokens.

    Args:
        dim: channels.
        num_heads: attention heads.
        window_size: window side.
        shift_size: cyclic shift of the windows (0: plain windows).
        mlp_hidden: hidden channels of the MLP.
        mask_resolution: for shifted blocks, the (square) map size whose mask SwinIR stores as the
            ``attn_mask`` buffer; it is kept only so checkpoints load strictly (masks for the actual
            size come from :func:`window_plan`).
    """

    def __init__(
        self, dim: int, num_heads: int, window_size: int, shift_size: int, mlp_hidden: int, mask_resolution: int = 0
    ) -> None:
        super().__init__()
        if not 0 <= shift_size < window_size:
            raise ValueError(f"shift_size {shift_size} must be in [0, window_size={window_size})")
        self.window_size = window_size
        self.shift_size = shift_size
        self.norm1 = nn.LayerNorm(dim)
        self.attn = WindowAttention(dim, window_size, num_heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, mlp_hidden)
        if shift_size > 0:
            mask = shifted_window_mask(mask_resolution, mask_resolution, window_size, shift_size)
            self.register_buffer("attn_mask", mask)

    def forward(self, x: Tensor, plan: WindowPlan) -> Tensor:
        """Args:
            x: (B*H*W, C) tokens in this block's window order (``plan.perm[shift_size]``).
            plan: the token orders of the map.

        Returns:
            (B*H*W, C) in the same order.
        """
        m, c = x.shape
        n = self.window_size**2
        s = self.shift_size
        h = self.attn(self.norm1(x).view(m // n, n, c), plan.patterns[s], plan.mask_index.get(s)).view(m, c)
        x = h.add_(x)
        return self.mlp(self.norm2(x)).add_(x)


class BasicLayer(nn.Module):
    """A sequence of Swin blocks (SwinIR ``BasicLayer`` without downsampling).

    Args:
        dim: channels.
        shifts: cyclic shift of each block (SwinIR: 0 for even blocks, ``window_size // 2`` for odd).
        num_heads, window_size, mlp_hidden, mask_resolution: see :class:`SwinTransformerBlock`.
    """

    def __init__(
        self, dim: int, shifts: Sequence[int], num_heads: int, window_size: int, mlp_hidden: int, mask_resolution: int
    ) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(
            SwinTransformerBlock(dim, num_heads, window_size, s, mlp_hidden, mask_resolution) for s in shifts
        )

    def forward(self, x: Tensor, plan: WindowPlan) -> Tensor:
        """Args:
            x: (B*H*W, C) tokens in raster order (``b, y, x``).

        Returns:
            (B*H*W, C) in raster order.
        """
        order: int | None = None
        for blk in self.blocks:
            if order != blk.shift_size:
                x = x.index_select(0, plan.move(order, blk.shift_size))
                order = blk.shift_size
            x = blk(x, plan)
        return x.index_select(0, plan.move(order, None))


class RSTB(nn.Module):
    """Residual Swin Transformer Block (SwinIR, ``resi_connection='1conv'``, patch size 1).

    ``out = x + conv3x3(swin_blocks(x))``.

    Args:
        dim: channels.
        depth: number of Swin blocks (odd ones shifted by ``window_size // 2``).
        num_heads: attention heads.
        window_size: window side.
        mlp_hidden: MLP hidden channels (SwinIR: ``4 * dim``).
        mask_resolution: map size of the stored ``attn_mask`` buffers (SwinIR's ``input_resolution``).
        shifts: explicit per-block shifts, overriding the even/odd rule.

    Shape:
        (B, dim, H, W) -> (B, dim, H, W) with H and W multiples of ``window_size``; the output is
        channels_last-strided.
    """

    def __init__(
        self,
        dim: int,
        depth: int,
        num_heads: int,
        window_size: int,
        mlp_hidden: int,
        mask_resolution: int,
        shifts: Sequence[int] | None = None,
    ) -> None:
        super().__init__()
        if shifts is None:
            shifts = [0 if j % 2 == 0 else window_size // 2 for j in range(depth)]
        self.window_size = window_size
        self.shifts = tuple(sorted(set(shifts)))
        self.residual_group = BasicLayer(dim, shifts, num_heads, window_size, mlp_hidden, mask_resolution)
        self.conv = Conv2d(dim, dim, 3, 1, 1)

    def forward(self, x: Tensor) -> Tensor:
        b, c, h, w = x.shape
        ws = self.window_size
        if h % ws or w % ws:
            raise ValueError(f"RSTB needs a feature map whose sides are multiples of {ws}, got {h}x{w}")
        plan = window_plan(b, h, w, ws, self.shifts, x.device)
        tokens = x.permute(0, 2, 3, 1).reshape(b * h * w, c)  # free when x is channels_last
        y = self.residual_group(tokens, plan)
        y = y.view(b, h, w, c).permute(0, 3, 1, 2)  # channels_last-strided NCHW view
        return conv2d_fused(y, self.conv, residual=x)
