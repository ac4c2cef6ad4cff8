"""Image files <-> tensors (Pillow).  Tensors are (1, C, H, W) float32 in [0, 1], C in {1, 3, 4}."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from .errors import InvalidInputError

IMAGE_EXT = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff")


def load_image(path: str | os.PathLike[str]) -> Tensor:
    """Read an image file as (1, C, H, W) float32 in [0, 1]: gray stays 1 channel, alpha is kept."""
    try:
        with Image.open(path) as im:
            im.load()
            if im.mode in ("I;16", "I;16B", "I"):
                arr = np.asarray(im, dtype=np.float32) / 65535.0
                return torch.from_numpy(arr)[None, None].clamp_(0, 1)
            has_alpha = "A" in im.getbands() or (im.mode == "P" and "transparency" in im.info)
            if im.mode in ("L", "1"):
                im = im.convert("L")
            else:
                im = im.convert("RGBA" if has_alpha else "RGB")
            arr = np.asarray(im, dtype=np.float32) / 255.0
    except (OSError, ValueError) as e:
        raise InvalidInputError(f"{path}: not a readable image ({e})") from e
    if arr.ndim == 2:
        arr = arr[:, :, None]
    return torch.from_numpy(np.ascontiguousarray(arr.transpose(2, 0, 1)))[None]


def save_image(image: Tensor, path: str | os.PathLike[str]) -> None:
    """Write (1, C, H, W) or (C, H, W) in [0, 1] as 8-bit; the format follows the extension."""
    x = image[0] if image.ndim == 4 else image
    arr = (x.detach().float().clamp(0, 1).cpu().numpy().transpose(1, 2, 0) * 255.0).round().astype(np.uint8)
    if arr.shape[2] == 1:
        arr = arr[:, :, 0]
    im = Image.fromarray(arr)
    if Path(path).suffix.lower() in (".jpg", ".jpeg") and im.mode == "RGBA":
        im = im.convert("RGB")
    im.save(path)


def list_images(folder: str | os.PathLike[str]) -> list[Path]:
    """Image files directly inside a folder, sorted by name."""
    return sorted(p for p in Path(folder).iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXT)
