"""Would a Winograd F(4,3) convolution written in PyTorch ops beat oneDNN's direct float32 convolution on one RRDB
dense block (64 + 4x32 channels)?  The measurement behind BENCHMARKS.md's ncnn section (issue 18, item 5); not used by
the package.

F(4x4, 3x3) (Lavin & Gray 2016): 6x6 input tiles at stride 4, ``Y = A^T [(G g G^T) . (B^T d B)] A``.  Each feature
map is transformed once (the dense block's concatenation becomes a slice of one Winograd-domain buffer), the 36
Winograd-domain products are one batched matmul per convolution, and the output transform is a matmul with
``kron(A^T, A^T)``.

Usage::

    python bench/bench_winograd_probe.py --threads 2
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from realsr_core.models.blocks.rrdb import ResidualDenseBlock

# F(4, 3) with the points 0, +-1, +-2 and infinity (float64 for the weight transform).
B_T = torch.tensor([[4, 0, -5, 0, 1, 0], [0, -4, -4, 1, 1, 0], [0, 4, -4, -1, 1, 0], [0, -2, -1, 2, 1, 0],
                    [0, 2, -1, -2, 1, 0], [0, 4, 0, -5, 0, 1]], dtype=torch.float64)
G = torch.tensor([[1 / 4, 0, 0], [-1 / 6, -1 / 6, -1 / 6], [-1 / 6, 1 / 6, -1 / 6], [1 / 24, 1 / 12, 1 / 6],
                  [1 / 24, -1 / 12, 1 / 6], [0, 0, 1]], dtype=torch.float64)
A_T = torch.tensor([[1, 1, 1, 1, 1, 0], [0, 1, -1, 2, -2, 0], [0, 1, 1, 4, 4, 0], [0, 1, -1, 8, -8, 1]],
                   dtype=torch.float64)
KB, KA = torch.kron(B_T, B_T).float(), torch.kron(A_T, A_T).float()  # (36, 36), (16, 36)


def weight_transform(w: torch.Tensor) -> torch.Tensor:
    """(C_out, C_in, 3, 3) -> (36, C_out, C_in)."""
    u = torch.einsum("ai,ocij,bj->aboc", G, w.double(), G)
    return u.reshape(36, w.shape[0], w.shape[1]).float().contiguous()


def input_transform(x: torch.Tensor, out: torch.Tensor) -> None:
    """(C, H, W), H and W multiples of 4 -> ``out`` (C, 36, H*W/16)."""
    tiles = F.unfold(F.pad(x, (1, 1, 1, 1))[:, None], 6, stride=4)  # (C, 36, tiles)
    torch.matmul(KB, tiles, out=out)


def dense_block_winograd(x: torch.Tensor, u: list[torch.Tensor], b: list[torch.Tensor]) -> torch.Tensor:
    """ResidualDenseBlock on (C, H, W) with weights from :func:`weight_transform`."""
    c, h, w = x.shape
    th, tw = h // 4, w // 4
    grow = u[0].shape[1]
    v = torch.empty(c + 4 * grow, 36, th * tw)  # every feature's transform, concatenated by construction
    input_transform(x, v[:c])
    off = c
    for k in range(5):
        m = torch.bmm(u[k], v[: c + k * grow].transpose(0, 1))  # (36, C_out, tiles)
        y5 = (KA @ m.view(36, -1)).view(4, 4, -1, th, tw).permute(2, 3, 0, 4, 1)
        y = torch.empty(y5.shape)
        torch.add(y5, b[k].view(-1, 1, 1, 1, 1), out=y)
        y = y.view(-1, h, w)
        if k == 4:
            return y.mul_(0.2).add_(x)
        F.leaky_relu_(y, 0.2)
        input_transform(y, v[off:off + grow])
        off += grow
    raise AssertionError("unreachable")


def best_of(fn, n: int = 5) -> float:
    fn()
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=2)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    block = ResidualDenseBlock(64, 32).eval()
    u = [weight_transform(conv.weight.detach()) for conv in block._convs()]
    b = [conv.bias.detach() for conv in block._convs()]
    with torch.inference_mode():
        for size in (128, 256):
            x = torch.rand(1, 64, size, size)
            x_cl = x.contiguous(memory_format=torch.channels_last)  # the fused oneDNN path
            err = (dense_block_winograd(x[0], u, b) - block(x_cl)[0]).abs().max().item()
            direct = best_of(lambda x_cl=x_cl: block(x_cl))
            wino = best_of(lambda x=x: dense_block_winograd(x[0], u, b))
            print(f"{size}x{size}: direct {direct * 1e3:.1f} ms, Winograd F(4,3) {wino * 1e3:.1f} ms, "
                  f"speed-up {direct / wino:.2f}x, max difference {err:.1e}")


if __name__ == "__main__":
    main()
