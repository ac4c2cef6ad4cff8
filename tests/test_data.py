"""HR photos shipped in packages and random patches (realsr_core.training.data)."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest
import torch
from helpers import skimage_photo

from realsr_core.errors import InvalidInputError
from realsr_core.training import data

skimage_data = pytest.importorskip("skimage.data")

SKIMAGE_RGB = (
    "astronaut",
    "coffee",
    "chelsea",
    "rocket",
    "hubble_deep_field",
    "retina",
    "immunohistochemistry",
    "motorcycle_left",
    "motorcycle_right",
)


def find_patch(patch: np.ndarray, img: np.ndarray) -> int | None:
    """Index (0..7) of the square symmetry that maps a crop of ``img`` onto ``patch``, or None."""
    for s in range(8):
        # undo the symmetry: transpose last, so first
        q = patch.transpose(0, 2, 1) if s & 4 else patch
        q = q[:, ::-1, :] if s & 2 else q
        q = q[:, :, ::-1] if s & 1 else q
        p = q.shape[-1]
        ys, xs = np.nonzero((img[:, : img.shape[1] - p + 1, : img.shape[2] - p + 1] == q[:, :1, :1]).all(0))
        for y, x in zip(ys, xs, strict=True):
            if np.array_equal(img[:, y : y + p, x : x + p], q):
                return s
    return None


def test_photo_names_lists_the_packaged_photos() -> None:
    names = data.photo_names()
    assert len(names) == len(set(names))
    assert set(SKIMAGE_RGB) <= set(names)
    # optional sources are listed exactly when installed
    assert ({"china", "flower"} <= set(names)) == (importlib.util.find_spec("sklearn") is not None)
    assert ("grace_hopper" in names) == (importlib.util.find_spec("matplotlib") is not None)


def test_load_photo_is_the_packaged_image() -> None:
    img = data.load_photo("astronaut")
    assert img.shape == (3, 512, 512) and img.dtype == torch.float32
    assert torch.equal(img, skimage_photo("astronaut")[0])
    cam = data.load_photo("camera")  # grey photo -> R = G = B
    assert cam.shape == (3, 512, 512)
    assert torch.equal(cam[0], cam[1]) and torch.equal(cam[1], cam[2])
    assert torch.equal(cam[0], torch.from_numpy(skimage_data.camera()).float() / 255)
    with pytest.raises(InvalidInputError):
        data.load_photo("no_such_photo")


def test_large_photos_are_shrunk_by_an_integer_factor() -> None:
    full = data.load_photo("retina", max_side=None)
    assert full.shape == (3, 1411, 1411)
    small = data.load_photo("retina", max_side=1000)
    assert small.shape == (3, 705, 705)  # factor ceil(1411 / 1000) = 2
    # antialiased: the mean colour is kept
    assert torch.allclose(small.mean((1, 2)), full.mean((1, 2)), atol=2e-3)
    for name in data.photo_names():
        if name.startswith("plasma_"):
            assert max(data.load_photo(name).shape[1:]) <= data.MAX_SIDE


def test_heldout_photos_never_in_train() -> None:
    train = [n for n, _ in data.photos("train")]
    held = [n for n, _ in data.photos("heldout")]
    assert held == [n for n in data.HELDOUT if n in data.photo_names()]
    assert {"astronaut", "coffee", "chelsea"} <= set(held)
    assert not set(train) & set(data.HELDOUT)
    assert set(train) | set(held) == set(data.photo_names())
    ds = data.PatchDataset("train", patch_size=64, scale=4)
    assert not set(ds.names) & set(data.HELDOUT)
    # the patches themselves come from training photos: none is a crop of a held-out one
    g = torch.Generator().manual_seed(3)
    patches = (ds.batch(6, g) * 255).round().to(torch.uint8).numpy()
    for name in ("astronaut", "coffee"):
        img = (data.load_photo(name) * 255).round().to(torch.uint8).numpy()
        assert all(find_patch(p, img) is None for p in patches)
    with pytest.raises(InvalidInputError):
        data.photos("test")  # type: ignore[arg-type]


def test_patches_shape_range_and_determinism() -> None:
    ds = data.PatchDataset(patch_size=48, scale=4, names=["chelsea", "rocket", "gravel"])
    b1 = ds.batch(8, torch.Generator().manual_seed(7))
    b2 = ds.batch(8, torch.Generator().manual_seed(7))
    b3 = ds.batch(8, torch.Generator().manual_seed(8))
    assert b1.shape == (8, 3, 48, 48) and b1.dtype == torch.float32
    assert b1.min() >= 0 and b1.max() <= 1 and b1.std() > 0.02
    assert torch.equal(b1, b2)
    assert not torch.equal(b1, b3)
    it = iter(ds)
    first = next(it)
    assert first.shape == (3, 48, 48)
    assert torch.equal(
        first, next(iter(data.PatchDataset(patch_size=48, scale=4, names=["chelsea", "rocket", "gravel"])))
    )
    with pytest.raises(InvalidInputError):
        data.PatchDataset(patch_size=50, scale=4, names=["chelsea"])  # not a multiple of the scale
    with pytest.raises(InvalidInputError):
        data.PatchDataset(patch_size=1024, scale=4, names=["chelsea"])  # larger than the photo


def test_patches_are_crops_with_flips_and_rotations() -> None:
    ds = data.PatchDataset(patch_size=16, scale=4, names=["chelsea"])
    img = (data.load_photo("chelsea") * 255).round().to(torch.uint8).numpy()
    patches = (ds.batch(24, torch.Generator().manual_seed(0)) * 255).round().to(torch.uint8).numpy()
    found = [find_patch(p, img) for p in patches]
    assert None not in found
    assert len(set(found)) >= 4  # flips and transposes are used


def test_photos_drawn_by_area() -> None:
    # gravel (512x512) is grey, retina (1411x1411) is colour: gravel should give 512^2 / (512^2 + 1411^2) ~ 11.6 %
    ds = data.PatchDataset(patch_size=16, scale=4, names=["gravel", "retina"], max_side=None)
    b = ds.batch(1500, torch.Generator().manual_seed(1))
    grey = ((b[:, 0] == b[:, 1]) & (b[:, 1] == b[:, 2])).flatten(1).all(1) & (b.mean((1, 2, 3)) > 0.1)
    p = 512**2 / (512**2 + 1411**2)
    sd = (1500 * p * (1 - p)) ** 0.5
    assert abs(grey.sum().item() - 1500 * p) < 4 * sd
