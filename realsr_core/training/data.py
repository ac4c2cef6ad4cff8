"""High-resolution training photos that ship inside installed packages, and random HR patches.

No machine here can download a dataset, so the ground truth is gathered from the photographs that
come with common packages (each is optional; what is missing is skipped silently):

* scikit-image (``skimage/data``): astronaut, coffee, chelsea, rocket, hubble_deep_field, retina,
  immunohistochemistry, motorcycle_left / motorcycle_right, and the grey photos camera, brick,
  grass, gravel (loaded as R = G = B: their textures are real camera detail, which SR learns from;
  colour is learnt from the others).  Synthetic images, clip-art and logos are left out.
* scikit-learn (``sklearn/datasets/images``): china, flower.
* matplotlib (``mpl-data/sample_data``): grace_hopper.
* Debian's ``plasma-workspace-wallpapers`` (``/usr/share/wallpapers``): its photographs only, in
  their largest size (2560x1600); the rendered / vector-art wallpapers are left out because their
  flat shading and perfect edges are not what a real-photo SR model should learn.

The files are read directly from the package folders with Pillow (the packages are not imported),
so nothing ever reaches the network.  :data:`HELDOUT` names the photos kept for evaluation; they
never appear in the ``"train"`` split.
"""

from __future__ import annotations

import importlib.util
import math
from collections.abc import Iterator, Sequence
from functools import cache, lru_cache
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from ..errors import InvalidInputError

__all__ = ["HELDOUT", "MAX_SIDE", "PatchDataset", "load_photo", "photo_names", "photos"]

Split = Literal["train", "heldout"]

# Evaluation photos, never trained on: small, varied (portrait, objects, animal, landscape) and all
# present wherever scikit-image, scikit-learn and matplotlib are installed.
HELDOUT: tuple[str, ...] = ("astronaut", "coffee", "chelsea", "china", "grace_hopper")

# Photos whose long side exceeds this are shrunk by the smallest integer factor that fits (bicubic
# with antialiasing).  Besides keeping the in-memory cache small, shrinking large camera JPEGs
# removes their compression artefacts and sensor noise, which an HR target should not contain.
MAX_SIDE: int = 2048

_SKIMAGE: dict[str, str] = {
    "astronaut": "astronaut.png",
    "coffee": "coffee.png",
    "chelsea": "chelsea.png",
    "rocket": "rocket.jpg",
    "hubble_deep_field": "hubble_deep_field.jpg",
    "retina": "retina.jpg",
    "immunohistochemistry": "ihc.png",
    "motorcycle_left": "motorcycle_left.png",
    "motorcycle_right": "motorcycle_right.png",
    "camera": "camera.png",
    "brick": "brick.png",
    "grass": "grass.png",
    "gravel": "gravel.png",
}
_SKLEARN: dict[str, str] = {"china": "china.jpg", "flower": "flower.jpg"}
_MATPLOTLIB: dict[str, str] = {"grace_hopper": "grace_hopper.jpg"}
_WALLPAPER_DIR = Path("/usr/share/wallpapers")
# The photographs among Plasma 5.27's wallpapers (the others are rendered art).
_WALLPAPER_PHOTOS: tuple[str, ...] = (
    "BytheWater",
    "ColdRipple",
    "ColorfulCups",
    "DarkestHour",
    "EveningGlow",
    "FallenLeaf",
    "Grey",
    "OneStandsOut",
    "Path",
    "summer_1am",
)


def _package_dir(package: str) -> Path | None:
    """Folder of an installed package, found without importing it (importing sklearn takes seconds)."""
    try:
        spec = importlib.util.find_spec(package)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def _largest_wallpaper(folder: Path) -> Path | None:
    """The biggest ``WxH.{jpg,png}`` of one wallpaper package folder."""
    best, best_area = None, 0
    for f in (folder / "contents" / "images").glob("*"):
        if f.suffix.lower() not in (".jpg", ".jpeg", ".png"):
            continue
        try:
            w, h = (int(v) for v in f.stem.lower().split("x"))
        except ValueError:
            continue
        if w * h > best_area:
            best, best_area = f, w * h
    return best


@lru_cache(maxsize=1)
def _photo_files() -> dict[str, Path]:
    """Every available photo name -> its file, in a fixed order."""
    files: dict[str, Path] = {}
    for package, sub, table in (
        ("skimage", "data", _SKIMAGE),
        ("sklearn", "datasets/images", _SKLEARN),
        ("matplotlib", "mpl-data/sample_data", _MATPLOTLIB),
    ):
        root = _package_dir(package)
        if root is None:
            continue
        for name, file in table.items():
            path = root / sub / file
            if path.is_file():
                files[name] = path
    for folder in _WALLPAPER_PHOTOS:
        path = _largest_wallpaper(_WALLPAPER_DIR / folder)
        if path is not None:
            files[f"plasma_{folder.lower()}"] = path
    return files


def photo_names() -> list[str]:
    """Names of every photo available on this machine (scikit-image, scikit-learn, matplotlib,
    Plasma wallpapers), held-out ones included, in a fixed order."""
    return list(_photo_files())


@cache
def _load_u8(name: str, max_side: int | None) -> Tensor:
    """Decoded photo as a (3, H, W) uint8 tensor, cached (uint8 keeps the cache 4x smaller than float)."""
    files = _photo_files()
    if name not in files:
        raise InvalidInputError(f"unknown or unavailable photo {name!r}; available: {', '.join(files)}")
    with Image.open(files[name]) as im:
        im = im.convert("RGB")  # grey photos become R = G = B
        long_side = max(im.size)
        if max_side is not None and long_side > max_side:
            f = math.ceil(long_side / max_side)
            # Pillow's bicubic widens its kernel when shrinking, i.e. it antialiases.
            im = im.resize((im.width // f, im.height // f), Image.Resampling.BICUBIC)
        arr = np.asarray(im, dtype=np.uint8)
    return torch.from_numpy(arr.transpose(2, 0, 1).copy())


def load_photo(name: str, *, max_side: int | None = MAX_SIDE) -> Tensor:
    """One photo by name.

    Args:
        name: one of :func:`photo_names`.
        max_side: shrink by the smallest integer factor that brings the long side to at most this
            (``None`` keeps the original size).

    Returns:
        (3, H, W) float32 RGB in [0, 1] (a fresh tensor; the decoded uint8 photo stays cached).
    """
    return _load_u8(name, max_side).float() / 255.0


def _split_names(split: Split) -> list[str]:
    if split not in ("train", "heldout"):
        raise InvalidInputError(f'split must be "train" or "heldout", got {split!r}')
    names = photo_names()
    if split == "heldout":
        return [n for n in HELDOUT if n in names]
    held = set(HELDOUT)
    return [n for n in names if n not in held]


def photos(split: Split) -> list[tuple[str, Tensor]]:
    """Every available photo of a split as (name, (3, H, W) float32 RGB in [0, 1]).

    ``"heldout"`` follows the order of :data:`HELDOUT`; ``"train"`` is everything else.
    """
    return [(n, load_photo(n)) for n in _split_names(split)]


class PatchDataset(torch.utils.data.IterableDataset):
    """Random square HR patches from a split, with random flips and 90-degree rotations.

    A photo is drawn with probability proportional to its area (so every pixel is about equally
    likely to be seen), then a uniformly placed ``patch_size`` crop, then one of the 8 symmetries
    of the square.  Photos smaller than a patch are skipped.  All randomness comes from the
    generator passed in, so a seed fixes the batches.

    Args:
        split: ``"train"`` (default) or ``"heldout"``.
        patch_size: side of the HR patches; a multiple of ``scale`` so the LR is exact.
        scale: the SR factor the patches are for.
        seed: seed of the generator used when iterating (``batch`` takes its own generator).
        names: use exactly these photos instead of a split (e.g. a small subset in tests).
        max_side: see :func:`load_photo`.
    """

    def __init__(
        self,
        split: Split = "train",
        patch_size: int = 128,
        scale: int = 4,
        *,
        seed: int = 0,
        names: Sequence[str] | None = None,
        max_side: int | None = MAX_SIDE,
    ) -> None:
        super().__init__()
        if scale < 1 or patch_size < scale or patch_size % scale:
            raise InvalidInputError(f"patch_size must be a positive multiple of scale {scale}, got {patch_size}")
        self.split, self.patch_size, self.scale, self.seed, self.max_side = split, patch_size, scale, seed, max_side
        chosen = list(names) if names is not None else _split_names(split)
        self.images: list[tuple[str, Tensor]] = []
        for n in chosen:
            img = _load_u8(n, max_side)
            if min(img.shape[-2:]) >= patch_size:
                self.images.append((n, img))
        if not self.images:
            raise InvalidInputError(f"no photo of {chosen} is at least {patch_size}x{patch_size}")
        areas = torch.tensor([float(img.shape[-2] * img.shape[-1]) for _, img in self.images], dtype=torch.float64)
        self.weights = areas / areas.sum()

    @property
    def names(self) -> list[str]:
        """The photos patches are drawn from."""
        return [n for n, _ in self.images]

    def batch(self, batch_size: int, generator: torch.Generator) -> Tensor:
        """Draw ``batch_size`` random patches.

        Args:
            batch_size: number of patches B.
            generator: CPU generator all the randomness is drawn from.

        Returns:
            (B, 3, P, P) float32 RGB in [0, 1] on the CPU, P = ``patch_size``.
        """
        if batch_size < 1:
            raise InvalidInputError(f"batch_size must be >= 1, got {batch_size}")
        p = self.patch_size
        which = torch.multinomial(self.weights, batch_size, replacement=True, generator=generator)
        sym = torch.randint(0, 8, (batch_size,), generator=generator)
        # Crops and flips are numpy views: per-patch torch ops would each start the intra-op thread
        # pool, which on a busy CPU costs far more than the copy itself.
        out = np.empty((batch_size, 3, p, p), dtype=np.uint8)
        for i in range(batch_size):
            img = self.images[int(which[i])][1].numpy()
            h, w = img.shape[-2:]
            top = int(torch.randint(0, h - p + 1, (1,), generator=generator))
            left = int(torch.randint(0, w - p + 1, (1,), generator=generator))
            patch = img[:, top : top + p, left : left + p]
            s = int(sym[i])
            if s & 1:
                patch = patch[:, :, ::-1]
            if s & 2:
                patch = patch[:, ::-1, :]
            if s & 4:
                patch = patch.transpose(0, 2, 1)
            out[i] = patch
        return torch.from_numpy(out).float() / 255.0

    def __iter__(self) -> Iterator[Tensor]:
        """Endless single (3, P, P) patches; each DataLoader worker gets its own seed."""
        info = torch.utils.data.get_worker_info()
        g = torch.Generator().manual_seed(self.seed + (info.id if info is not None else 0))
        while True:
            yield self.batch(1, g)[0]
