"""Image files <-> tensors (Pillow).  Tensors are (1, C, H, W) float32 in [0, 1], C in {1, 2, 3, 4}
(gray, gray + alpha, RGB, RGBA).

Writing follows the pack's one output rule: a file is written under a temporary name in its own folder
and renamed over the target only when complete, so an interrupted or failed write never leaves a partial
image, and a symbolic link is never written through.
"""

from __future__ import annotations

import os
from contextlib import nullcontext
from pathlib import PurePath
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageOps
from torch import Tensor

from .errors import InvalidInputError
from .files import atomic_write
from .storage import UriPath

ImagePath = str | os.PathLike[str] | UriPath


def _source(path: ImagePath) -> Any:
    """What Pillow opens: the path itself, or an open file for a URI (closed by the ``with``)."""
    return path.open("rb") if isinstance(path, UriPath) else nullcontext(path)

IMAGE_EXT = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff", ".gif")
# Extensions Pillow writes, and the format each names (the temporary file's name cannot tell Pillow).
WRITE_FORMATS = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG", ".webp": "WEBP", ".bmp": "BMP", ".tif": "TIFF",
                 ".tiff": "TIFF"}
# Pillow's own decompression-bomb threshold (about 89.5 megapixels); the command line can raise it.
DEFAULT_MAX_PIXELS: int = 89_478_485


def check_pixel_limit(path: ImagePath, width: int, height: int, max_pixels: int | None) -> None:
    """Refuse an image larger than ``max_pixels`` (None or 0: no limit) before it is decoded."""
    if max_pixels and width * height > max_pixels:
        raise InvalidInputError(
            f"{path}: {width}x{height} = {width * height / 1e6:.1f} megapixels is above the limit of "
            f"{max_pixels / 1e6:.1f} megapixels that protects against decompression bombs; if you trust the file, "
            f"raise the limit (command line: --max-pixels {width * height})"
        )


def load_image(path: ImagePath, *, max_pixels: int | None = DEFAULT_MAX_PIXELS) -> Tensor:
    """Read an image file as (1, C, H, W) float32 in [0, 1].

    Gray stays 1 channel (2 with alpha), colour is RGB (RGBA with alpha); EXIF orientation is applied, so
    the pixels are as a viewer shows them.

    Args:
        path: the image file.
        max_pixels: refuse images with more pixels (decompression-bomb guard); None or 0 for no limit.

    Raises:
        InvalidInputError: unreadable, truncated, animated / multi-page, or over ``max_pixels``.
    """
    try:
        with _source(path) as src, Image.open(src) as im:
            check_pixel_limit(path, *im.size, max_pixels)
            frames = getattr(im, "n_frames", 1)
            if frames > 1:
                raise InvalidInputError(
                    f"{path}: an animated or multi-page image ({frames} frames); only still images are upscaled. "
                    "Extract the frames first (e.g. ffmpeg -i in.gif frame_%04d.png) and upscale the folder"
                )
            im.load()
            im = ImageOps.exif_transpose(im)
            if im.mode in ("I;16", "I;16B", "I;16L", "I"):
                arr = np.asarray(im, dtype=np.float32) / 65535.0
                return torch.from_numpy(arr)[None, None].clamp_(0, 1)
            has_alpha = "A" in im.getbands() or "transparency" in im.info
            gray = im.mode in ("L", "LA", "La", "1") or (im.mode == "P" and _palette_is_gray(im))
            target = ("LA" if has_alpha else "L") if gray else ("RGBA" if has_alpha else "RGB")
            arr = np.asarray(im.convert(target), dtype=np.float32) / 255.0
    except Image.DecompressionBombError as e:
        raise InvalidInputError(f"{path}: refused as a possible decompression bomb ({e}); if you trust the file, "
                                "raise the limit (command line: --max-pixels)") from e
    except (OSError, ValueError, SyntaxError) as e:  # Pillow raises SyntaxError for some broken headers
        raise InvalidInputError(f"{path}: not a readable image ({e})") from e
    if arr.ndim == 2:
        arr = arr[:, :, None]
    return torch.from_numpy(np.ascontiguousarray(arr.transpose(2, 0, 1)))[None]


def _palette_is_gray(im: Image.Image) -> bool:
    palette = im.getpalette() or []
    rgb = np.asarray(palette[: len(palette) // 3 * 3]).reshape(-1, 3)
    return bool(len(rgb)) and bool((rgb == rgb[:, :1]).all())


def image_size(path: ImagePath) -> tuple[int, int] | None:
    """(width, height) of a readable image as a viewer shows it (EXIF rotation applied), else None."""
    try:
        with _source(path) as src, Image.open(src) as im:
            w, h = im.size
            orientation = im.getexif().get(0x0112, 1)
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError):
        return None
    return (h, w) if orientation in (5, 6, 7, 8) else (w, h)


def is_complete_image(path: ImagePath, size: tuple[int, int]) -> bool:
    """True when ``path`` decodes fully to an image of ``size`` (width, height): a finished result."""
    try:
        with _source(path) as src, Image.open(src) as im:
            if im.size != tuple(size):
                return False
            im.load()
        return True
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError):
        return False


def check_output_path(path: ImagePath) -> str:
    """The Pillow format for an output path, or InvalidInputError naming the known extensions."""
    ext = PurePath(str(path)).suffix.lower()
    if ext not in WRITE_FORMATS:
        raise InvalidInputError(
            f"{path}: unknown output type {ext or '(no extension)'!r}; use one of {', '.join(WRITE_FORMATS)}"
            + (", or end the path with / for a folder" if not ext else "")
        )
    return WRITE_FORMATS[ext]


def save_image(image: Tensor, path: ImagePath, *, overwrite: bool = False) -> None:
    """Write (1, C, H, W) or (C, H, W) in [0, 1] as 8-bit, atomically; the format follows the extension.

    The file is written as a hidden temporary file in the same folder and renamed over ``path`` when
    complete: an interrupted write leaves no partial image and the previous file, if any, intact.

    Args:
        image: C = 1 gray, 2 gray + alpha, 3 RGB, 4 RGBA.
        path: target file; its extension must be one of ``WRITE_FORMATS``.
        overwrite: replace an existing file (never a symbolic link).

    Raises:
        InvalidInputError: unknown extension, an existing file without ``overwrite``, or a symbolic link.
        OSError: the folder is not writable (nothing is left behind).
    """
    fmt = check_output_path(path)
    x = image[0] if image.ndim == 4 else image
    arr = (x.detach().float().clamp(0, 1).cpu().numpy().transpose(1, 2, 0) * 255.0).round().astype(np.uint8)
    im = Image.fromarray(arr[:, :, 0] if arr.shape[2] == 1 else arr, mode={1: "L", 2: "LA", 3: "RGB", 4: "RGBA"}[arr.shape[2]])
    if fmt in ("JPEG", "BMP") and im.mode in ("LA", "RGBA"):  # formats without alpha
        im = im.convert(im.mode[:-1])
    atomic_write(path, lambda fh: im.save(fh, format=fmt), overwrite=overwrite)
