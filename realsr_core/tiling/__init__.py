"""The one tiling engine of the core: tile plans and weights, memory back-off, image tiles and VAE windows.

* :mod:`.plan`: the axis planner (:func:`plan_tiles`; :func:`plan_axis` adds the context windows), the feather
  weights of image / VAE tiles and StableSR's Gaussian tile weights.
* :mod:`.memory`: out-of-memory detection, memory budgets and the tile sizes that fit them, and the one
  out-of-memory back-off (:func:`run_with_backoff`: halve the tile and restart the pass).
* :mod:`.image`: :func:`run_tiled`, feed-forward image models tile by tile.
* :mod:`.vae`: VAE encode / decode window by window with GroupNorm statistics shared by all windows, also
  for a VAE descriptor (:func:`tiled_vae_encode` / :func:`tiled_vae_decode`, StableSR's CFW decoder included).
* :mod:`.types`: the progress / cancel callbacks every long-running loop of the core takes.

Models never import this package: the front-ends and engines drive the models through it.
"""

from .image import DEFAULT_MIN_TILE, TileFn, run_tiled
from .memory import DEFAULT_CPU_BUDGET, auto_tile_size, balanced_tile, is_oom_error, memory_budget
from .plan import GAUSSIAN_VARIANCE, check_ints, feather_weight, gaussian_weights, plan_tiles, tile_weight
from .types import CancelFn, ProgressFn
from .vae import SharedGroupNorm, StatsMode, tiled_decode, tiled_encode, tiled_vae_decode, tiled_vae_encode

__all__ = [
    "DEFAULT_CPU_BUDGET",
    "DEFAULT_MIN_TILE",
    "GAUSSIAN_VARIANCE",
    "CancelFn",
    "ProgressFn",
    "SharedGroupNorm",
    "StatsMode",
    "TileFn",
    "auto_tile_size",
    "balanced_tile",
    "check_ints",
    "feather_weight",
    "gaussian_weights",
    "is_oom_error",
    "memory_budget",
    "plan_tiles",
    "run_tiled",
    "tile_weight",
    "tiled_decode",
    "tiled_encode",
    "tiled_vae_decode",
    "tiled_vae_encode",
]
