"""Tiled VAE encode / decode with GroupNorm statistics shared by all tiles.

A VAE run tile by tile differs from the whole-image run in two ways:

* **Receptive field.**  Convolutions near a tile border see zero padding instead of the neighbouring
  pixels (and the mid-block attention sees only the tile).  Each tile is therefore run on a larger
  *window* (``context`` extra cells per side, thrown away afterwards), and neighbouring tiles overlap by
  ``overlap`` cells that are blended with a linear feather ramp (:func:`.plan.feather_weight`).
* **GroupNorm.**  Every GroupNorm normalises with the mean / variance of the *whole* feature map.  Per-tile
  statistics make each tile's tone and contrast drift (dark tiles get brightened, flat tiles get their noise
  amplified) and show as a patchwork.  Here every GroupNorm layer instead uses one set of statistics for
  all tiles:

  - ``stats="downscale"`` (default): the input is area-downscaled so that it fits one window (or
    ``stats_size`` cells), each channel's mean / standard deviation is reset to the full-resolution value
    (``match_moments``; without it a latent, which is noise-like at the pixel level, loses half its variance
    and the decoder statistics go badly wrong), the network runs once on that copy, and every GroupNorm
    layer records the per-sample, per-group mean and variance it sees.  All tiles are then normalised with
    these frozen values.  Cost: one extra window-sized forward, no extra memory.
  - ``stats="none"``: per-tile GroupNorm (for comparisons: it shows the tone drift).

  The statistics are installed by overriding ``forward`` of each ``nn.GroupNorm`` *instance* found in the
  given modules (never the class), inside a context manager that restores the original attribute on exit,
  also when a tile raises.  The override computes with the layer's own ``num_groups``, ``eps``, ``weight``
  and ``bias`` (cast to the input's device and dtype), so it works for subclasses and for host modules that
  cast their weights on the fly (ComfyUI's ``ops.*.GroupNorm``).  A layer called several times per forward
  keeps one set of statistics per call, matched by call order.

**The approximation.**  Statistics from a downscaled copy are not those of the full-resolution image: the
copy lacks the fine detail, and every layer sees content at a different scale.  For a trained VAE on natural
(roughly scale-invariant) images this is the "fast" mode of the common Tiled VAE tools, reported to shift
contrast / brightness slightly.  Measured here on the 256x256 astronaut crop in [-1, 1] with *random-weight*
VAEs built from our classes (ch 32, mult 1-2-4-4, CFW fusion, w = 0.5; no trained weights were available),
2x2 tiles -- encode: 136 px tiles, 16 px overlap, 32 px context; decode: 16 latent px tiles, hard borders,
4 latent px context (statistics from a 2x downscaled copy)::

                                          shared (downscale)   per-tile GN   whole-image stats (bound)
    residual convs x0.3 (smoother net)
      encode: latent rel. mean abs diff          0.090            0.270           0.067
      decode: PSNR vs whole / mean abs diff      25.4 dB / 0.075  18.4 dB / 0.153 26.8 dB / 0.063
      decode: border / elsewhere gradient        1.06             1.98            1.10   (whole decode: 0.94)
    fixture rule as is (gain 1, chaotic)
      encode: latent rel. mean abs diff          0.238            0.328           0.154
      decode: PSNR vs whole / mean abs diff      16.3 dB / 0.179  15.7 dB / 0.184 21.3 dB / 0.094
      decode: border / elsewhere gradient        1.23             1.68            1.20   (whole decode: 0.93)

The "whole-image stats" column uses the exact statistics of the whole image with the same tiles, so what
remains there is the context (receptive-field) error, which a larger ``context`` reduces; the difference
between the first and the last column is the cost of the approximation.  Shared statistics remove the
tile-border steps that per-tile GroupNorm makes (border gradient ratio ~1).  A random network amplifies
small input changes far more than a trained VAE does, so these errors are pessimistic.  The downscale factor
of the statistics copy grows with the image: with the descriptor defaults (512 px encode tiles + 64 px
context, 64 latent px decode tiles + 8) a 2048 px image is measured at ~1/3 scale, a 4096 px one at ~1/6;
``stats_size`` buys a larger copy for one call's worth of extra memory.

Memory: only one window lives on the compute device at a time; outputs are accumulated on
``output_device`` (CPU by default) in float32.  Inputs (image, latent, CFW features) may stay on the CPU:
each window is cropped there and moved.  On an out-of-memory error the pass restarts with half the tile
size (down to ``min_tile``; :func:`.memory.run_with_backoff`).  Note the size of StableSR's CFW features when a tiled encode assembles them:
96 values per image pixel (256 channels at 1/2, 512 at 1/4 resolution), i.e. 1.6 GB in float32 for a
2048x2048 image and 6.4 GB for 4096x4096 (half that in the float16 ``out_dtype``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Literal, Protocol

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import Cancelled, InvalidInputError
from .memory import guard_oom, run_with_backoff
from .plan import check_ints, plan_axis, tile_weight
from .types import CancelFn, ProgressFn

__all__ = [
    "SharedGroupNorm",
    "StatsMode",
    "tiled_decode",
    "tiled_encode",
    "tiled_vae_decode",
    "tiled_vae_encode",
]

StatsMode = Literal["downscale", "none"]
_STATS_MODES: tuple[str, ...] = ("downscale", "none")
# Float32 elements (64 MiB) converted at a time when downscaling the inputs for the statistics pass.
_CHUNK_ELEMENTS = 1 << 24


# ---------------------------------------------------------------------------- GroupNorm override


class _LayerStats:
    """Running sums of one GroupNorm call site: per sample and group, float64 to avoid cancellation."""

    __slots__ = ("count", "mean", "sq", "var")

    def __init__(self) -> None:
        self.count = 0.0
        self.mean: Tensor | None = None  # sum of x, then (after freezing) the mean
        self.sq: Tensor | None = None  # sum of x^2
        self.var: Tensor | None = None  # set by freezing

    def add(self, mean: Tensor, var: Tensor, n: int) -> None:
        m = mean.double()
        s1, s2 = m * n, (var.double() + m * m) * n
        if self.mean is None or self.sq is None:
            self.mean, self.sq = s1, s2
        else:
            if self.mean.shape != s1.shape:
                raise InvalidInputError(
                    f"GroupNorm statistics were recorded for batch/groups {tuple(self.mean.shape)} but a call has "
                    f"{tuple(s1.shape)}; every tile call must use the same batch size"
                )
            self.mean, self.sq = self.mean + s1, self.sq + s2
        self.count += n

    def freeze(self) -> None:
        assert self.mean is not None and self.sq is not None and self.count > 0
        mean = self.mean / self.count
        self.var = (self.sq / self.count - mean * mean).clamp_min(0.0).float()
        self.mean = mean.float()
        self.sq = None


class SharedGroupNorm:
    """Context manager that makes every ``nn.GroupNorm`` in ``modules`` use shared statistics.

    Usage::

        with SharedGroupNorm(vae.decoder) as gn:
            gn.record()                 # next calls measure (and use) their own statistics
            gn.begin_call(); fn(small)  # one or more recording forwards
            gn.freeze()                 # pool what was recorded; later calls use it
            for tile in tiles:
                gn.begin_call(); out = fn(tile)
        # every GroupNorm's original forward is back, also after an exception

    Outside ``record``/``freeze`` (mode ``"off"``) the layers run their original ``forward``.

    Args:
        modules: a module or modules whose ``nn.GroupNorm`` instances (any subclass) are overridden.
    """

    def __init__(self, modules: nn.Module | Iterable[nn.Module]) -> None:
        mods = [modules] if isinstance(modules, nn.Module) else list(modules)
        seen: dict[int, nn.GroupNorm] = {}
        for mod in mods:
            for m in mod.modules():
                if isinstance(m, nn.GroupNorm):
                    seen.setdefault(id(m), m)
        self.layers: list[nn.GroupNorm] = list(seen.values())
        self.mode: Literal["off", "record", "apply"] = "off"
        self._stats: list[list[_LayerStats]] = [[] for _ in self.layers]
        self._calls: list[int] = [0] * len(self.layers)
        self._saved: list[tuple[bool, Any]] = []
        self._active = False

    # -------------------------------------------------------------- install / restore
    def __enter__(self) -> SharedGroupNorm:
        if self._active:
            raise RuntimeError("SharedGroupNorm is already active")
        self._saved = []
        try:
            for i, layer in enumerate(self.layers):
                had = "forward" in layer.__dict__
                self._saved.append((had, layer.__dict__.get("forward")))
                # An instance attribute shadows the class's forward for this layer only.
                layer.forward = self._make_forward(i, layer, layer.forward)  # type: ignore[method-assign]
        except BaseException:
            self._restore()
            raise
        self._active = True
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._restore()
        self._active = False
        self.mode = "off"

    def _restore(self) -> None:
        for layer, (had, previous) in zip(self.layers, self._saved, strict=False):
            if had:
                layer.forward = previous  # type: ignore[method-assign]
            else:
                layer.__dict__.pop("forward", None)
        self._saved = []

    def _make_forward(
        self, index: int, layer: nn.GroupNorm, original: Callable[[Tensor], Tensor]
    ) -> Callable[..., Any]:
        def forward(x: Tensor, *args: Any, **kwargs: Any) -> Any:
            if self.mode == "off" or args or kwargs:
                return original(x, *args, **kwargs)
            return self._normalize(index, layer, x)

        return forward

    # -------------------------------------------------------------- modes
    def record(self) -> None:
        """Forget any statistics; the following calls measure and accumulate theirs."""
        self._stats = [[] for _ in self.layers]
        self.mode = "record"
        self.begin_call()

    def freeze(self) -> None:
        """Pool the recorded statistics; the following calls are normalised with them."""
        if self.mode != "record":
            raise RuntimeError("freeze() needs a record() phase first")
        for per_layer in self._stats:
            for st in per_layer:
                st.freeze()
        self.mode = "apply"
        self.begin_call()

    def off(self) -> None:
        """Run the layers' original forward (per-call statistics)."""
        self.mode = "off"

    def begin_call(self) -> None:
        """Mark the start of a network forward: call sites are matched by order from here."""
        self._calls = [0] * len(self.layers)

    @property
    def recorded_layers(self) -> int:
        """Number of layers that recorded at least one call."""
        return sum(1 for s in self._stats if s)

    # -------------------------------------------------------------- the normalisation
    def _normalize(self, index: int, layer: nn.GroupNorm, x: Tensor) -> Tensor:
        b, c = x.shape[:2]
        g = layer.num_groups
        if c != layer.num_channels or c % g:
            raise InvalidInputError(f"GroupNorm({g}, {layer.num_channels}) got {c} channels")
        k = self._calls[index]
        self._calls[index] += 1
        per_layer = self._stats[index]
        if self.mode == "record":
            # The layer normalises with what it measures (plain GroupNorm), and the values are kept.
            var, mean = _group_var_mean(x, g)
            if k == len(per_layer):
                per_layer.append(_LayerStats())
            elif k > len(per_layer):
                raise RuntimeError("GroupNorm call order changed between recording forwards")
            per_layer[k].add(mean, var, x[0].numel() // g)
        else:
            if k >= len(per_layer):
                raise RuntimeError(
                    f"GroupNorm layer {index} is called {k + 1} times in this forward but only {len(per_layer)} "
                    "statistics were recorded; the recording forward must take the same path as the tiles"
                )
            st = per_layer[k]
            assert st.mean is not None and st.var is not None
            mean, var = st.mean.to(x.device), st.var.to(x.device)
            if mean.shape[0] != b:
                if mean.shape[0] != 1:
                    raise InvalidInputError(
                        f"GroupNorm statistics were recorded for batch {mean.shape[0]}, a tile has batch {b}"
                    )
                mean, var = mean.expand(b, -1), var.expand(b, -1)
        # y = x * scale + shift with per-(sample, channel) scale / shift: one pass over x.
        rstd = torch.rsqrt(var.float() + layer.eps)
        scale = rstd.repeat_interleave(c // g, dim=1)
        shift = -mean.float().repeat_interleave(c // g, dim=1) * scale
        if layer.weight is not None:
            weight = layer.weight.to(device=x.device, dtype=torch.float32)
            scale = scale * weight
            shift = shift * weight
        if layer.bias is not None:
            shift = shift + layer.bias.to(device=x.device, dtype=torch.float32)
        view = (b, c) + (1,) * (x.dim() - 2)
        return torch.addcmul(shift.to(x.dtype).view(view), x, scale.to(x.dtype).view(view))


def _group_var_mean(x: Tensor, groups: int) -> tuple[Tensor, Tensor]:
    """Per-sample, per-group (biased) variance and mean, (B, groups) each, in float32 at least."""
    xs = x.reshape(x.shape[0], groups, -1)
    return torch.var_mean(xs if xs.dtype == torch.float64 else xs.float(), dim=-1, correction=0)


# ---------------------------------------------------------------------------- runner

_Input = tuple[Tensor, int]  # (tensor, pixels per grid cell)


def _as_list(y: Tensor | Sequence[Tensor]) -> list[Tensor]:
    if isinstance(y, Tensor):
        return [y]
    if isinstance(y, Sequence) and all(isinstance(t, Tensor) for t in y):
        return list(y)
    raise InvalidInputError(f"the tile function must return a tensor or a sequence of tensors, got {type(y).__name__}")


def _downscale_copy(x: Tensor, size: tuple[int, int], match_moments: bool) -> Tensor:
    """Area-downscaled copy of ``x`` (B, C, H, W) at ``size``, in ``x``'s dtype and device.

    With ``match_moments`` each sample's channels get back their full-resolution mean and standard deviation:
    averaging removes the variance of fine detail, which would bias every GroupNorm's statistics (most for
    noise-like inputs such as latents).  Works on channel chunks, so a large float16 input (e.g. CFW features of a
    big image) is never copied whole to float32.
    """
    b, c, h, w = x.shape
    chunk = max(1, _CHUNK_ELEMENTS // max(1, b * h * w))
    parts = []
    for c0 in range(0, c, chunk):
        xf = x[:, c0 : c0 + chunk].float()
        small = F.interpolate(xf, size=size, mode="area")
        if match_moments and (h, w) != tuple(size):
            s_std, s_mean = torch.std_mean(small, dim=(-2, -1), keepdim=True)
            x_std, x_mean = torch.std_mean(xf, dim=(-2, -1), keepdim=True)
            small = (small - s_mean) * (x_std / s_std.clamp_min(1e-6)) + x_mean
        parts.append(small.to(x.dtype))
        del xf
    return torch.cat(parts, dim=1)


def _crop(inputs: Sequence[_Input], y0: int, y1: int, x0: int, x1: int, device: torch.device) -> list[Tensor]:
    return [t[..., y0 * f : y1 * f, x0 * f : x1 * f].to(device) for t, f in inputs]


def _factors(outs: list[Tensor], win_h: int, win_w: int, batch: int) -> list[int]:
    factors = []
    for y in outs:
        h, w = y.shape[-2:]
        if y.dim() != 4 or y.shape[0] != batch or h % win_h or w % win_w or h // win_h != w // win_w or h < win_h:
            raise InvalidInputError(
                f"each tile output must be (B={batch}, C, k*{win_h}, k*{win_w}) for a {win_h}x{win_w}-cell window "
                f"with an integer k >= 1, got {tuple(y.shape)}"
            )
        factors.append(h // win_h)
    return factors


@dataclass(frozen=True)
class _Job:
    """One tiled run: everything a pass needs but the tile size (sizes in grid cells)."""

    fn: Callable[[list[Tensor]], list[Tensor]]
    inputs: Sequence[_Input]
    grid: tuple[int, int]
    overlap: int
    context: int
    stats: str
    stats_size: int | None
    match_moments: bool
    modules: nn.Module | Iterable[nn.Module]
    device: torch.device
    output_device: torch.device
    progress: ProgressFn | None
    cancel: CancelFn | None


def _run_pass(job: _Job, tile: int) -> list[Tensor]:
    fn, inputs, device, output_device = job.fn, job.inputs, job.device, job.output_device
    stats, progress, cancel = job.stats, job.progress, job.cancel
    height, width = job.grid
    batch = inputs[0][0].shape[0]
    ay, ax = plan_axis(height, tile, job.overlap, job.context), plan_axis(width, tile, job.overlap, job.context)
    jobs = [(iy, ix) for iy in range(len(ay.starts)) for ix in range(len(ax.starts))]

    if len(jobs) == 1:  # the whole input is one window: exact, nothing to share
        if cancel is not None and cancel():
            raise Cancelled("tiled VAE cancelled before its only tile")
        outs = [y.to(output_device) for y in guard_oom(fn, _crop(inputs, 0, height, 0, width, device))]
        if progress is not None:
            progress(1, 1)
        return outs

    n_stats = 1 if stats == "downscale" else 0
    total = n_stats + len(jobs)
    done = 0

    def tick() -> None:
        nonlocal done
        done += 1
        if progress is not None:
            progress(done, total)

    def check_cancel() -> None:
        if cancel is not None and cancel():
            raise Cancelled(f"tiled VAE cancelled after {done} of {total} steps")

    def window(iy: int, ix: int) -> tuple[int, int, int, int]:
        y0, x0 = ay.window_starts[iy], ax.window_starts[ix]
        return y0, y0 + ay.window, x0, x0 + ax.window

    with SharedGroupNorm(job.modules if stats != "none" else []) as gn:
        if stats == "downscale":
            check_cancel()
            gn.record()
            # The largest copy with the input's aspect ratio whose longer side is at most stats_size cells
            # (default: fits one window, so this call needs no more memory than a tile).
            limit_h, limit_w = (ay.window, ax.window) if job.stats_size is None else (job.stats_size, job.stats_size)
            s = min(1.0, limit_h / height, limit_w / width)
            sh, sw = max(1, math.floor(height * s)), max(1, math.floor(width * s))
            small = [_downscale_copy(t, (sh * f, sw * f), job.match_moments).to(device) for t, f in inputs]
            guard_oom(fn, small)
            del small
            gn.freeze()
            tick()

        outs: list[Tensor] = []
        factors: list[int] = []
        wsums: dict[int, Tensor] = {}
        for iy, ix in jobs:
            check_cancel()
            gn.begin_call()
            y0, y1, x0, x1 = window(iy, ix)
            ys = guard_oom(fn, _crop(inputs, y0, y1, x0, x1, device))
            if not outs:
                factors = _factors(ys, ay.window, ax.window, batch)
                outs = [
                    torch.zeros(batch, y.shape[1], height * f, width * f, dtype=torch.float32, device=output_device)
                    for y, f in zip(ys, factors, strict=True)
                ]
            elif len(ys) != len(outs) or _factors(ys, ay.window, ax.window, batch) != factors:
                raise InvalidInputError("the tile function returned a different number or layout of outputs")
            for j, (y, f) in enumerate(zip(ys, factors, strict=True)):
                ky, kx = (ay.starts[iy] - y0) * f, (ax.starts[ix] - x0) * f
                th, tw = ay.tile * f, ax.tile * f
                kept = y[:, :, ky : ky + th, kx : kx + tw].to(device=output_device, dtype=torch.float32)
                w = tile_weight(ay.weight(iy, f), ax.weight(ix, f)).to(output_device)
                oy, ox = ay.starts[iy] * f, ax.starts[ix] * f
                outs[j][:, :, oy : oy + th, ox : ox + tw].addcmul_(kept, w)
                if f not in wsums:
                    wsums[f] = torch.zeros(height * f, width * f, dtype=torch.float32, device=output_device)
                if j == factors.index(f):  # one weight sum per resolution
                    wsums[f][oy : oy + th, ox : ox + tw] += w
            del ys
            tick()
    return [o.div_(wsums[f]) for o, f in zip(outs, factors, strict=True)]


def _run(job: _Job, *, tile: int, min_tile: int, out_dtype: torch.dtype) -> list[Tensor]:
    """Run passes, halving the tile on out-of-memory errors."""
    check_ints(
        ("tile", tile, 1), ("overlap", job.overlap, 0), ("context", job.context, 0), ("min_tile", min_tile, 1),
        unit=" (in grid cells)",
    )
    if job.stats not in _STATS_MODES:
        raise InvalidInputError(f"stats must be one of {_STATS_MODES}, got {job.stats!r}")
    size = job.stats_size
    if size is not None and (isinstance(size, bool) or not isinstance(size, int) or size < 1):
        raise InvalidInputError(f"stats_size must be None or an integer >= 1 (grid cells), got {size!r}")

    def run_pass(tile_cells: int) -> list[Tensor]:
        return [o.to(out_dtype) for o in _run_pass(job, tile_cells)]

    def describe(current: int) -> str:
        return (
            f"tiled VAE out of memory with {current}-cell tiles (+{job.context} context per side) on {job.device}, "
            f"and the tile cannot go below min_tile={min_tile}; free memory or use a lower precision."
        )

    with torch.no_grad():
        return run_with_backoff(run_pass, tile, length=max(job.grid), floor=min_tile, device=job.device,
                                describe=describe)


def _check_tensor(x: Tensor, what: str) -> None:
    if not isinstance(x, Tensor) or x.dim() != 4 or min(x.shape) < 1:
        shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
        raise InvalidInputError(f"{what} must be a non-empty (B, C, H, W) tensor, got {shape}")
    if not x.is_floating_point():
        raise InvalidInputError(f"{what} must be a floating-point tensor, got {x.dtype}")


def _device(device: torch.device | str | None, fallback: Tensor) -> torch.device:
    return fallback.device if device is None else torch.device(device)


# ---------------------------------------------------------------------------- public API


def tiled_encode(
    encoder_fn: Callable[[Tensor], Tensor | Sequence[Tensor]],
    modules: nn.Module | Iterable[nn.Module],
    image: Tensor,
    tile: int = 512,
    overlap: int = 64,
    *,
    context: int = 64,
    downscale: int = 8,
    stats: StatsMode = "downscale",
    stats_size: int | None = None,
    match_moments: bool = True,
    device: torch.device | str | None = None,
    output_device: torch.device | str = "cpu",
    out_dtype: torch.dtype | None = None,
    progress: ProgressFn | None = None,
    cancel: CancelFn | None = None,
    min_tile: int = 64,
) -> Tensor | list[Tensor]:
    """Encode a large image tile by tile with shared GroupNorm statistics.

    Args:
        encoder_fn: maps an image window (B, C, h, w) on ``device`` to a tensor or a list of tensors, each
            (B, C_j, h * k_j / downscale, w * k_j / downscale) with an integer ``k_j`` (the latent moments:
            k = 1; CFW features at H/2 and H/4: k = 4 and 2).
        modules: the module(s) whose GroupNorm layers ``encoder_fn`` runs (e.g. ``vae.encoder``).
        image: (B, C, H, W), H and W multiples of ``downscale``, on any device (windows are cropped where it
            is and moved to ``device``).
        tile, overlap, context: kept tile size, blended overlap and extra context per side, in image pixels;
            rounded down to multiples of ``downscale``.
        downscale: image pixels per latent pixel (8).
        stats: GroupNorm statistics mode (see the module docstring).
        stats_size: longer side, in latent pixels, of the downscaled copy the statistics are measured on
            (default: one window, so that call needs no more memory than a tile).  Larger is more accurate and
            needs proportionally more memory for that one call.
        match_moments: give the downscaled copy back each channel's full-resolution mean and standard
            deviation before measuring (see the module docstring).
        device: where ``encoder_fn`` runs (default: the image's device).
        output_device: where outputs are assembled (CPU by default, so device memory does not grow with the
            image).
        out_dtype: output dtype (default: the image's).
        progress: called as ``progress(done, total)`` after every network call (the statistics pass counts).
        cancel: polled before every network call; returning True raises :class:`~realsr_core.errors.Cancelled`.
        min_tile: smallest tile (pixels) the out-of-memory halving may reach.

    Returns:
        what ``encoder_fn`` returns (a tensor, or a list in the same order) for the whole image, on
        ``output_device``.
    """
    _check_tensor(image, "image")
    check_ints(("downscale", downscale, 1))
    h, w = image.shape[-2:]
    if h % downscale or w % downscale:
        raise InvalidInputError(f"image height and width must be multiples of {downscale}, got {h}x{w} (pad it first)")
    for name, value in (("tile", tile), ("overlap", overlap), ("context", context), ("min_tile", min_tile)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise InvalidInputError(f"{name} must be a non-negative integer (pixels), got {value!r}")
    single = False

    def fn(windows: list[Tensor]) -> list[Tensor]:
        nonlocal single
        y = encoder_fn(windows[0])
        single = isinstance(y, Tensor)
        return _as_list(y)

    job = _Job(
        fn,
        [(image, downscale)],
        (h // downscale, w // downscale),
        overlap=overlap // downscale,
        context=context // downscale,
        stats=stats,
        stats_size=stats_size,
        match_moments=match_moments,
        modules=modules,
        device=_device(device, image),
        output_device=torch.device(output_device),
        progress=progress,
        cancel=cancel,
    )
    outs = _run(job, tile=max(1, tile // downscale), min_tile=max(1, min_tile // downscale),
                out_dtype=out_dtype or image.dtype)
    return outs[0] if single else outs


def tiled_decode(
    decoder_fn: Callable[..., Tensor],
    modules: nn.Module | Iterable[nn.Module],
    latent: Tensor,
    tile: int = 64,
    overlap: int = 8,
    *,
    context: int = 8,
    features: Sequence[Tensor] | None = None,
    stats: StatsMode = "downscale",
    stats_size: int | None = None,
    match_moments: bool = True,
    device: torch.device | str | None = None,
    output_device: torch.device | str = "cpu",
    out_dtype: torch.dtype | None = None,
    progress: ProgressFn | None = None,
    cancel: CancelFn | None = None,
    min_tile: int = 8,
) -> Tensor:
    """Decode a large latent tile by tile with shared GroupNorm statistics (also StableSR's CFW decoder).

    Args:
        decoder_fn: ``decoder_fn(z)`` or, when ``features`` is given, ``decoder_fn(z, feats)``: maps a latent
            window (B, C, h, w) on ``device`` (and the matching crops of the features, at their own
            resolutions) to an image window (B, C_out, k*h, k*w) (k = 8 for SD).
        modules: the module(s) whose GroupNorm layers ``decoder_fn`` runs (e.g. ``vae.decoder``, which
            contains the CFW fusion layers).
        latent: (B, C, h, w) on any device.
        tile, overlap, context: kept tile size, blended overlap and extra context per side, in latent pixels.
            Every network call sees at most ``(tile + 2*context)^2`` latent pixels.
        features: optional encoder features for CFW fusion, each (B, C_j, k_j*h, k_j*w) with an integer k_j
            (StableSR: 4 for the H/2 feature, 2 for the H/4 one), on any device; each window is cropped at
            the feature's own resolution.
        stats, stats_size, match_moments, device, output_device, out_dtype, progress, cancel: see :func:`tiled_encode`.
        min_tile: smallest tile (latent pixels) the out-of-memory halving may reach.

    Returns:
        (B, C_out, k*h, k*w) on ``output_device``.
    """
    _check_tensor(latent, "latent")
    h, w = latent.shape[-2:]
    inputs: list[_Input] = [(latent, 1)]
    for i, f in enumerate(features or []):
        _check_tensor(f, f"features[{i}]")
        fh, fw = f.shape[-2:]
        if f.shape[0] != latent.shape[0] or fh % h or fw % w or fh // h != fw // w:
            raise InvalidInputError(
                f"features[{i}] must be (B={latent.shape[0]}, C, k*{h}, k*{w}) with an integer k, got {tuple(f.shape)}"
            )
        inputs.append((f, fh // h))

    def fn(windows: list[Tensor]) -> list[Tensor]:
        y = decoder_fn(windows[0], windows[1:]) if features is not None else decoder_fn(windows[0])
        if not isinstance(y, Tensor):
            raise InvalidInputError(f"decoder_fn must return a tensor, got {type(y).__name__}")
        return [y]

    job = _Job(
        fn,
        inputs,
        (h, w),
        overlap=overlap,
        context=context,
        stats=stats,
        stats_size=stats_size,
        match_moments=match_moments,
        modules=modules,
        device=_device(device, latent),
        output_device=torch.device(output_device),
        progress=progress,
        cancel=cancel,
    )
    return _run(job, tile=tile, min_tile=min_tile, out_dtype=out_dtype or latent.dtype)[0]


# ---------------------------------------------------------------------------- VAE descriptors


class VAEModel(Protocol):
    """What :func:`tiled_vae_encode` / :func:`tiled_vae_decode` use of a VAE descriptor
    (:class:`~realsr_core.models.stablesr.cfw.VAEDescriptor`: an SD VAE, optionally with StableSR's CFW decoder).
    """

    model: Any  # the autoencoder: its ``encoder`` / ``decoder`` modules hold the GroupNorm layers

    @property
    def device(self) -> torch.device: ...

    @property
    def dtype(self) -> torch.dtype: ...

    @property
    def downscale(self) -> int: ...

    def check_encode(self, image: Tensor) -> None: ...

    def check_decode(self, latent: Tensor, features: Sequence[Tensor] | None = None, w: float | None = None) -> float: ...

    def encode(self, image: Tensor, return_features: bool = True) -> tuple[Tensor, ...]: ...

    def decode(self, latent: Tensor, features: Sequence[Tensor] | None = None, w: float | None = None) -> Tensor: ...


def tiled_vae_encode(
    vae: VAEModel,
    image: Tensor,
    tile: int = 512,
    overlap: int = 64,
    *,
    context: int = 64,
    return_features: bool = True,
    stats: StatsMode = "downscale",
    stats_size: int | None = None,
    output_device: torch.device | str = "cpu",
    progress: ProgressFn | None = None,
    cancel: CancelFn | None = None,
) -> tuple[Tensor, ...]:
    """``vae.encode`` tile by tile with shared GroupNorm statistics.

    Args:
        vae: the VAE descriptor.
        image: (B, 3, H, W) in [-1, 1], H and W multiples of 8, on any device (tiles are moved to the
            model's device).
        tile, overlap, context: tile size, blended overlap and discarded context margin, in image pixels
            (rounded down to multiples of 8).
        return_features: also return the CFW features (assembled on ``output_device`` too).
        stats, stats_size, output_device, progress, cancel: see :func:`tiled_encode` (``stats_size`` in latent
            pixels).

    Returns:
        as ``vae.encode``: ``(mean, logvar)`` plus, with ``return_features``, the feature list; assembled on
        ``output_device`` in ``image``'s dtype.
    """
    vae.check_encode(image)

    def fn(x: Tensor) -> list[Tensor]:
        mean, logvar, *rest = vae.encode(x, return_features=return_features)
        return [mean, logvar, *(rest[0] if rest else [])]

    outs = tiled_encode(
        fn,
        vae.model.encoder,
        image.to(vae.dtype),
        tile,
        overlap,
        context=context,
        downscale=vae.downscale,
        stats=stats,
        stats_size=stats_size,
        device=vae.device,
        output_device=output_device,
        out_dtype=image.dtype,
        progress=progress,
        cancel=cancel,
    )
    assert isinstance(outs, list)
    return (outs[0], outs[1], outs[2:]) if return_features else (outs[0], outs[1])


def tiled_vae_decode(
    vae: VAEModel,
    latent: Tensor,
    features: Sequence[Tensor] | None = None,
    w: float | None = None,
    tile: int = 64,
    overlap: int = 8,
    *,
    context: int = 8,
    stats: StatsMode = "downscale",
    stats_size: int | None = None,
    output_device: torch.device | str = "cpu",
    progress: ProgressFn | None = None,
    cancel: CancelFn | None = None,
) -> Tensor:
    """``vae.decode`` tile by tile with shared GroupNorm statistics; the CFW features are cropped per tile.

    Args:
        vae: the VAE descriptor.
        latent: (B, 4, h, w) unscaled, on any device.
        features: the LR image's encoder features at their own resolutions (any device; each tile's crop
            is moved to the model's device).  Ignored when ``w == 0``.
        w: CFW fidelity weight in [0, 1] (default as in ``vae.decode``).
        tile, overlap, context: in latent pixels.
        stats, stats_size, output_device, progress, cancel: see :func:`tiled_decode`.

    Returns:
        (B, 3, 8h, 8w) on ``output_device`` in ``latent``'s dtype.
    """
    weight = vae.check_decode(latent, features, w)  # clear errors before any work
    use_features = weight > 0.0  # only a CFW VAE accepts w > 0

    def decoder_fn(z: Tensor, feats: Sequence[Tensor] | None = None) -> Tensor:
        return vae.decode(z, feats, weight)

    return tiled_decode(
        decoder_fn,
        vae.model.decoder,
        latent.to(vae.dtype),
        tile,
        overlap,
        context=context,
        features=list(features) if use_features and features is not None else None,
        stats=stats,
        stats_size=stats_size,
        device=vae.device,
        output_device=output_device,
        out_dtype=latent.dtype,
        progress=progress,
        cancel=cancel,
    )
