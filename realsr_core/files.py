"""Writing files so that nothing a user has is lost: one atomic writer for images, weights and run states."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO

from .errors import InvalidInputError

if TYPE_CHECKING:
    from .storage import UriPath

# Marks the hidden temporary file of a write in progress (``.NAME.realsr-partial-XXXX``).
PARTIAL_MARK = ".realsr-partial-"


def atomic_write(path: str | os.PathLike[str] | UriPath, write: Callable[[BinaryIO], None], *, overwrite: bool = True) -> None:
    """Write a file so that readers see either the old file (or none) or the complete new one, never a part.

    ``path`` may be a :class:`storage.UriPath` (see there).  ``write`` fills a hidden temporary file beside ``path``; it is flushed to disk and moved over ``path``
    with ``os.replace`` (atomic on POSIX and Windows).  On any exception, KeyboardInterrupt included, the
    temporary file is removed and ``path`` is left as it was.

    Raises:
        InvalidInputError: ``path`` is a symbolic link (never written through or replaced), or exists and
            ``overwrite`` is False.
    """
    from .storage import UriPath

    if isinstance(path, UriPath):
        if not overwrite and path.exists():
            raise InvalidInputError(f"{path}: exists; refusing to overwrite it")
        path.atomic_write(write, PARTIAL_MARK)
        return
    p = Path(path)
    if p.is_symlink():
        raise InvalidInputError(f"{p}: is a symbolic link (to {os.readlink(p)}); refusing to write through or "
                                "replace it")
    if not overwrite and p.exists():
        raise InvalidInputError(f"{p}: exists; refusing to overwrite it")
    fd, tmp = tempfile.mkstemp(prefix=f".{p.name}{PARTIAL_MARK}", dir=p.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o644)  # mkstemp makes 0600; the result is an ordinary readable file
        os.replace(tmp, p)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
