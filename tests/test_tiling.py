"""Tiled inference engine: plans, blend weights, exactness with a real conv net, control flow."""

from __future__ import annotations

from itertools import pairwise

import pytest
import torch
from torch import Tensor, nn

from realsr_core.errors import Cancelled, InvalidInputError
from realsr_core.tiling import (
    auto_tile_size,
    feather_weight,
    is_oom_error,
    memory_budget,
    plan_tiles,
    run_tiled,
    tile_weight,
)

# Receptive-field radius of the network below, in input pixels: two 3x3 convs (2) plus one 3x3
# conv after the x2 upsample (1 output pixel -> 1 input pixel).
RADIUS = 3


def make_net() -> nn.Module:
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1),
        nn.ReLU(),
        nn.Upsample(scale_factor=2, mode="nearest"),
        nn.Conv2d(8, 3, 3, padding=1),
    )
    return net.eval()


NET = make_net()


def image(batch: int, height: int, width: int, seed: int = 1) -> Tensor:
    return torch.rand(batch, 3, height, width, generator=torch.Generator().manual_seed(seed))


def whole(x: Tensor) -> Tensor:
    with torch.no_grad():
        return NET(x)


# ---------------------------------------------------------------------------- plans and weights


@pytest.mark.parametrize(
    ("length", "tile", "overlap"),
    [(100, 32, 8), (100, 30, 0), (37, 16, 4), (64, 16, 4), (17, 16, 15), (5, 1, 0), (33, 32, 16)],
)
def test_plan_covers_axis(length: int, tile: int, overlap: int) -> None:
    starts = plan_tiles(length, tile, overlap)
    assert starts[0] == 0 and starts[-1] == length - tile
    assert starts == sorted(set(starts))
    covered = torch.zeros(length, dtype=torch.bool)
    for s in starts:
        covered[s : s + tile] = True
    assert covered.all()
    shared = [a + tile - b for a, b in pairwise(starts)]
    assert all(o >= overlap for o in shared)  # never less than asked
    assert all(o == overlap for o in shared[:-1])  # exact except next to the anchored last tile


def test_plan_single_tile_and_refusals() -> None:
    assert plan_tiles(50, 50, 10) == [0]
    assert plan_tiles(50, 64, 100) == [0]
    with pytest.raises(InvalidInputError, match="overlap"):
        plan_tiles(100, 16, 16)
    with pytest.raises(InvalidInputError, match="tile"):
        plan_tiles(100, 0, 0)
    with pytest.raises(InvalidInputError, match="length"):
        plan_tiles(0, 16, 0)


def test_feather_weights() -> None:
    w = feather_weight(16, 4, ramp_start=False, ramp_end=False)
    assert torch.equal(w, torch.ones(16))
    w = feather_weight(16, 4, ramp_start=True, ramp_end=True)
    assert torch.equal(w[4:12], torch.ones(8))
    assert torch.allclose(w[:4], torch.tensor([0.2, 0.4, 0.6, 0.8]))
    assert (w > 0).all()
    # A falling and a rising ramp over the same pixels sum to exactly 1.
    left = feather_weight(16, 4, ramp_start=False, ramp_end=True)
    right = feather_weight(16, 4, ramp_start=True, ramp_end=False)
    assert torch.allclose(left[-4:] + right[:4], torch.ones(4))
    assert left[0] == 1 and right[-1] == 1  # image borders stay at 1

    # Along an axis with exact overlaps the weights form a partition of unity.
    length, tile, overlap = 52, 16, 4
    starts = plan_tiles(length, tile, overlap)
    assert [a + tile - b for a, b in pairwise(starts)] == [overlap] * (len(starts) - 1)
    total = torch.zeros(length)
    for i, s in enumerate(starts):
        total[s : s + tile] += feather_weight(tile, overlap, ramp_start=i > 0, ramp_end=i < len(starts) - 1)
    assert torch.allclose(total, torch.ones(length))

    # 2-D: a corner tile keeps weight 1 along its two image-border edges.
    wy = feather_weight(8, 2, ramp_start=False, ramp_end=True)
    wx = feather_weight(10, 3, ramp_start=False, ramp_end=True)
    w2 = tile_weight(wy, wx)
    assert w2.shape == (8, 10)
    assert torch.equal(w2[0, :7], torch.ones(7)) and torch.equal(w2[:6, 0], torch.ones(6))
    assert w2[-1, -1] == pytest.approx(1 / 3 * 1 / 4)


# ---------------------------------------------------------------------------- exactness


@pytest.mark.parametrize(
    ("shape", "tile", "overlap", "tiles_per_batch"),
    [
        ((1, 32, 32), 16, 0, 1),
        ((1, 37, 53), 16, 4, 1),
        ((2, 37, 53), 20, 6, 3),
        ((2, 29, 64), 24, 8, 3),
        ((1, 41, 23), 12, 3, 2),
        ((2, 17, 19), 64, 8, 1),  # tile larger than the image: one window
        ((1, 33, 47), 9, 0, 4),  # odd tile, several windows per call
    ],
)
def test_tiled_equals_whole(shape: tuple[int, int, int], tile: int, overlap: int, tiles_per_batch: int) -> None:
    x = image(*shape)
    ref = whole(x)
    out = run_tiled(NET, x, scale=2, tile=tile, overlap=overlap, context=RADIUS, tiles_per_batch=tiles_per_batch)
    assert out.shape == ref.shape
    assert (out - ref).abs().max().item() < 1e-5
    # More context than needed is just as exact.
    out = run_tiled(NET, x, scale=2, tile=tile, overlap=overlap, context=RADIUS + 5, tiles_per_batch=tiles_per_batch)
    assert (out - ref).abs().max().item() < 1e-5


def test_without_context_it_differs() -> None:
    x = image(1, 40, 40)
    ref = whole(x)
    for overlap in (0, 4):
        out = run_tiled(NET, x, scale=2, tile=16, overlap=overlap, context=0)
        assert (out - ref).abs().max().item() > 1e-3
    out = run_tiled(NET, x, scale=2, tile=16, overlap=0, context=RADIUS - 1)
    assert (out - ref).abs().max().item() > 1e-4  # one pixel short of the receptive field


def test_multiple_rounds_tiles_down() -> None:
    x = image(1, 50, 70)
    sizes: list[tuple[int, int]] = []

    def fn(t: Tensor) -> Tensor:
        sizes.append((t.shape[-2], t.shape[-1]))
        return whole(t)

    out = run_tiled(fn, x, scale=2, tile=30, overlap=4, context=4, multiple=8)
    assert (out - whole(x)).abs().max().item() < 1e-5
    assert set(sizes) == {(24 + 8, 24 + 8)}


# ---------------------------------------------------------------------------- control flow


def test_window_size_bound_and_batching() -> None:
    x = image(2, 45, 38)
    tile, context = 16, 5
    calls: list[tuple[int, ...]] = []

    def fn(t: Tensor) -> Tensor:
        calls.append(tuple(t.shape))
        return whole(t)

    run_tiled(fn, x, scale=2, tile=tile, overlap=4, context=context, tiles_per_batch=4)
    assert all(s[-2] <= tile + 2 * context and s[-1] <= tile + 2 * context for s in calls)
    assert {s[1:] for s in calls} == {(3, tile + 2 * context, tile + 2 * context)}  # equal windows
    n_tiles = 2 * len(plan_tiles(45, 16, 4)) * len(plan_tiles(38, 16, 4))
    assert sum(s[0] for s in calls) == n_tiles
    assert all(s[0] == 4 for s in calls[:-1])


def test_progress_totals() -> None:
    x = image(2, 40, 30)
    seen: list[tuple[int, int]] = []
    run_tiled(
        NET, x, scale=2, tile=16, overlap=4, context=3, tiles_per_batch=3, progress=lambda d, t: seen.append((d, t))
    )
    total = 2 * len(plan_tiles(40, 16, 4)) * len(plan_tiles(30, 16, 4))
    assert {t for _, t in seen} == {total}
    assert [d for d, _ in seen] == [min(total, 3 * (i + 1)) for i in range(len(seen))]
    assert seen[-1] == (total, total)


def test_cancel_stops_before_next_tile() -> None:
    x = image(1, 48, 48)
    calls = 0
    checks = 0

    def fn(t: Tensor) -> Tensor:
        nonlocal calls
        calls += 1
        return whole(t)

    def cancel() -> bool:
        nonlocal checks
        checks += 1
        return checks > 2  # let two tiles run, stop before the third

    with pytest.raises(Cancelled):
        run_tiled(fn, x, scale=2, tile=16, overlap=0, context=3, cancel=cancel)
    assert calls == 2

    class Stop(Exception):
        pass

    def cancel_raises() -> bool:
        raise Stop("host interrupted")

    with pytest.raises(Stop, match="host interrupted"):
        run_tiled(fn, x, scale=2, tile=16, context=3, cancel=cancel_raises)


def limited_fn(max_pixels: int, log: list[tuple[int, int]]):
    """A real memory-limited model: fails with an OOM error when a window has too many pixels."""

    def fn(t: Tensor) -> Tensor:
        log.append((t.shape[-2], t.shape[-1]))
        if t.shape[0] * t.shape[-2] * t.shape[-1] > max_pixels:
            raise torch.OutOfMemoryError(f"CUDA out of memory. Tried to allocate a {tuple(t.shape)} tile")
        return whole(t)

    return fn


def test_oom_halves_tile_and_restarts() -> None:
    x = image(1, 70, 90)
    log: list[tuple[int, int]] = []
    progress: list[tuple[int, int]] = []
    fn = limited_fn(30 * 30, log)
    out = run_tiled(
        fn,
        x,
        scale=2,
        tile=64,
        overlap=4,
        context=3,
        multiple=4,
        min_tile=8,
        progress=lambda d, t: progress.append((d, t)),
    )
    assert (out - whole(x)).abs().max().item() < 1e-5
    # 64 -> 32 -> 16: windows 70x70 (fail), 38x38 (fail), 22x22 (fit).
    assert log[0] == (64 + 6, 64 + 6) and log[1] == (32 + 6, 32 + 6)
    assert set(log[2:]) == {(16 + 6, 16 + 6)}
    final_total = len(plan_tiles(70, 16, 4)) * len(plan_tiles(90, 16, 4))
    assert progress[-1] == (final_total, final_total) and {t for _, t in progress} == {final_total}


def test_oom_with_cpu_allocator_message_and_batch() -> None:
    x = image(2, 40, 40)

    def fn(t: Tensor) -> Tensor:
        if t.shape[0] * t.shape[-2] * t.shape[-1] > 2000:
            raise RuntimeError("[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can't allocate memory")
        return whole(t)

    out = run_tiled(fn, x, scale=2, tile=40, overlap=2, context=3, tiles_per_batch=2, min_tile=8)
    assert (out - whole(x)).abs().max().item() < 1e-5


def test_oom_below_min_tile_reraises() -> None:
    x = image(1, 64, 64)
    log: list[tuple[int, int]] = []
    with pytest.raises(torch.OutOfMemoryError, match="min_tile=16"):
        run_tiled(limited_fn(10, log), x, scale=2, tile=64, context=2, min_tile=16)
    assert [s[0] for s in log] == [64, 32 + 4, 16 + 4]


def test_other_errors_propagate_untouched() -> None:
    x = image(1, 32, 32)
    err = RuntimeError("shape mismatch in layer 3")
    calls = 0

    def fn(t: Tensor) -> Tensor:
        nonlocal calls
        calls += 1
        raise err

    with pytest.raises(RuntimeError) as info:
        run_tiled(fn, x, scale=2, tile=16, context=2)
    assert info.value is err and calls == 1


def test_oom_detection() -> None:
    assert is_oom_error(torch.OutOfMemoryError("x"))
    assert is_oom_error(torch.cuda.OutOfMemoryError("x"))
    assert is_oom_error(RuntimeError("CUDA out of memory. Tried to allocate 2 GiB"))
    assert is_oom_error(RuntimeError("DefaultCPUAllocator: not enough memory"))
    assert is_oom_error(RuntimeError("MPS backend out of memory"))
    assert not is_oom_error(RuntimeError("size mismatch"))
    assert not is_oom_error(ValueError("out of memory"))  # only runtime errors are allocator errors


def test_output_device_and_dtype() -> None:
    x = image(1, 30, 30)
    ref = whole(x)
    for dtype in (torch.float16, torch.bfloat16, torch.float64):
        out = run_tiled(NET, x, scale=2, tile=16, overlap=4, context=3, output_device="cpu", out_dtype=dtype)
        assert out.dtype == dtype and out.device.type == "cpu"
        assert (out.float() - ref).abs().max().item() < 1e-2
    if torch.cuda.is_available():
        net = make_net().cuda()
        out = run_tiled(net, x, scale=2, tile=16, overlap=4, context=3, device="cuda", output_device="cuda")
        assert out.device.type == "cuda" and (out.cpu() - ref).abs().max().item() < 1e-4


def test_one_output_channel_and_scale_one() -> None:
    torch.manual_seed(3)
    net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 1, 5, padding=2)).eval()
    x = image(2, 27, 33)
    with torch.no_grad():
        ref = net(x)
    out = run_tiled(net, x, scale=1, tile=10, overlap=3, context=3, tiles_per_batch=5)
    assert out.shape == (2, 1, 27, 33) and (out - ref).abs().max().item() < 1e-5


def test_refusals() -> None:
    x = image(1, 16, 16)
    with pytest.raises(InvalidInputError, match="tile"):
        run_tiled(NET, x, scale=2, tile=0)
    with pytest.raises(InvalidInputError, match="context"):
        run_tiled(NET, x, scale=2, tile=8, context=-1)
    with pytest.raises(InvalidInputError, match=r"\(B, C, H, W\)"):
        run_tiled(NET, x[0], scale=2, tile=8)
    with pytest.raises(InvalidInputError, match="returned"):
        run_tiled(NET, x, scale=4, tile=8)  # fn's real scale is 2


# ---------------------------------------------------------------------------- sizing


def test_auto_tile_size() -> None:
    # Whole image fits: one tile covering it.
    assert auto_tile_size(100, 200, bytes_per_px=10, budget_bytes=100 * 200 * 10, multiple=8) == 200
    # Otherwise the largest square multiple of `multiple` within the budget.
    t = auto_tile_size(1000, 1000, bytes_per_px=100, budget_bytes=300 * 300 * 100, multiple=8)
    assert t == 296 and t * t * 100 <= 300 * 300 * 100
    assert auto_tile_size(1000, 1000, 100, 300 * 300 * 100, 8, max_tile=128) == 128
    assert auto_tile_size(100, 100, 100, 100 * 100 * 100, 8, max_tile=64) == 64
    assert auto_tile_size(1000, 1000, 100, 300 * 300 * 100, 8, context=20) == 256  # (256+40)^2 fits
    assert auto_tile_size(1000, 1000, 1e9, 10, 16) == 16  # nothing fits: smallest legal tile
    with pytest.raises(InvalidInputError):
        auto_tile_size(0, 10, 1, 1)


def test_memory_budget() -> None:
    """On a CPU "auto" tiles get a stated budget (1 GiB by default, adjustable), never all free RAM."""
    from realsr_core.tiling import DEFAULT_CPU_BUDGET

    budget = memory_budget("cpu")
    assert isinstance(budget, int) and 0 < budget <= DEFAULT_CPU_BUDGET == 1024**3
    assert memory_budget("cpu", cpu_budget=256 * 2**20) == min(256 * 2**20, budget)
    if torch.cuda.is_available():
        assert 0 < memory_budget("cuda") <= torch.cuda.get_device_properties(0).total_memory


def test_balanced_tile_runs_the_fewest_pixels_for_the_same_tile_count() -> None:
    from realsr_core.tiling import balanced_tile

    assert balanced_tile(1024, 558, 16) == 520 and plan_tiles(1024, 520, 16) == [0, 504]  # 2 tiles, 16 px shared
    assert len(plan_tiles(1024, 558, 16)) == 2 and plan_tiles(1024, 558, 16)[1] == 466  # 92 px run twice
    for length, tile, overlap, multiple in ((1000, 300, 16, 8), (777, 100, 0, 1), (513, 512, 16, 4), (64, 100, 8, 1)):
        even = balanced_tile(length, tile, overlap, multiple)
        assert even <= max(tile, length) and even % multiple == 0 or even >= length
        assert len(plan_tiles(length, even, min(overlap, even // 2))) == len(plan_tiles(length, tile, min(overlap, tile // 2)))
