"""Files named by URI (``s3://``, ``gs://``, ``hdfs://``, ``file://`` ...), for jobs whose images live beyond a local
disk, through ``pyarrow.fs`` (installed with Ray; an object store also needs its client, e.g. pyarrow's S3 support).

:class:`UriPath` offers the part of :class:`pathlib.Path` that :mod:`realsr_core.jobs` and
:mod:`realsr_core.imageio` use, so a job on URIs runs the local job's code: the same walk, refusals, skip
check and atomic writes.  A write goes to a hidden ``.NAME.realsr-partial-XXXX`` object that is moved over the
target when complete (a rename on a filesystem; on an object store a server-side copy, so the target appears
whole or not at all).  Options of the filesystem ride in the URI's query (pyarrow's own syntax, e.g.
``s3://bucket/photos?endpoint_override=host:9000&scheme=http``); they are kept for every file below it and
never printed, since they may hold credentials.
"""

from __future__ import annotations

import io
import re
import secrets
from collections.abc import Callable, Iterator
from functools import lru_cache
from pathlib import Path, PurePath, PurePosixPath
from typing import Any, BinaryIO

from .errors import InvalidInputError

_URI = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]+)://")  # two or more letters: never a Windows drive (C:/)


def is_uri(path: object) -> bool:
    return isinstance(path, UriPath) or (isinstance(path, str) and _URI.match(path) is not None)


def as_str(path: Path | UriPath) -> str:
    """A path another process (a Ray worker) turns back into the same file with :func:`as_path`."""
    return path.uri if isinstance(path, UriPath) else str(path.absolute())


def as_path(path: str | PurePath | UriPath) -> Path | UriPath:
    """A local :class:`Path`, or a :class:`UriPath` for a URI."""
    if isinstance(path, UriPath):
        return path
    return UriPath(path) if is_uri(path) else Path(path)


@lru_cache(maxsize=16)
def _filesystem(uri: str) -> tuple[Any, str]:
    try:
        import pyarrow.fs as pafs
    except ImportError as e:
        raise InvalidInputError(f"{_URI.match(uri).group(0)} paths need pyarrow: pip install \"ray[data]\" "  # type: ignore[union-attr]
                                "(or pip install pyarrow)") from e
    try:
        return pafs.FileSystem.from_uri(uri)
    except (ValueError, OSError, ImportError) as e:  # unknown scheme, a client pyarrow was built without
        raise InvalidInputError(f"cannot open {_URI.match(uri).group(0)} paths: {e}") from e  # type: ignore[union-attr]


class UriPath:
    """A file or folder named by a URI that ``pyarrow.fs.FileSystem.from_uri`` understands.

    Args:
        uri: ``scheme://[host]/path[?query]``; the query holds options of the filesystem (see the module).
    """

    def __init__(self, uri: str) -> None:
        base, _, query = uri.partition("?")
        base = base.rstrip("/") or base
        self._root = f"{base}?{query}" if query else base  # how the filesystem is made
        self.path = _filesystem(self._root)[1].rstrip("/")
        # What precedes the filesystem's path in the URI: "s3://", "file://", "hdfs://host:8020" ...
        self._prefix = base[: len(base) - len(self.path)] if base.endswith(self.path) else f"{_URI.match(base)[0]}"
        self._query = query

    @property
    def uri(self) -> str:
        """The whole URI, filesystem options included (for another process; never printed)."""
        return f"{self}?{self._query}" if self._query else str(self)

    @property
    def fs(self) -> Any:
        return _filesystem(self._root)[0]

    def _child(self, path: str) -> UriPath:
        child = object.__new__(UriPath)
        child._root, child._prefix, child._query, child.path = self._root, self._prefix, self._query, path
        return child

    # -- names (pure)
    def __str__(self) -> str:
        return f"{self._prefix}{self.path}"

    def __repr__(self) -> str:
        return f"UriPath({str(self)!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, UriPath) and (self._root, self.path) == (other._root, other.path)

    def __hash__(self) -> int:
        return hash((self._root, self.path))

    def __truediv__(self, other: str | PurePath) -> UriPath:
        return self._child(f"{self.path}/{PurePosixPath(*PurePath(other).parts)}")

    @property
    def _pure(self) -> PurePosixPath:
        return PurePosixPath(self.path)

    @property
    def name(self) -> str:
        return self._pure.name

    @property
    def stem(self) -> str:
        return self._pure.stem

    @property
    def suffix(self) -> str:
        return self._pure.suffix

    @property
    def parent(self) -> UriPath:
        return self._child(str(self._pure.parent))

    def with_name(self, name: str) -> UriPath:
        return self._child(str(self._pure.with_name(name)))

    def relative_to(self, other: UriPath) -> PurePosixPath:
        return self._pure.relative_to(other._pure)

    def resolve(self) -> UriPath:
        return self

    def absolute(self) -> UriPath:
        return self

    # -- the store
    def _type(self) -> int:
        import pyarrow.fs as pafs

        t = self.fs.get_file_info(self.path).type
        return {pafs.FileType.File: 1, pafs.FileType.Directory: 2}.get(t, 0)

    def exists(self) -> bool:
        return self._type() != 0

    def is_file(self) -> bool:
        return self._type() == 1

    def is_dir(self) -> bool:
        return self._type() == 2

    def is_symlink(self) -> bool:
        return False  # object stores have no links; pyarrow's local filesystem follows them

    def mkdir(self, parents: bool = False, exist_ok: bool = False) -> None:
        self.fs.create_dir(self.path, recursive=parents)

    def unlink(self, missing_ok: bool = False) -> None:
        try:
            self.fs.delete_file(self.path)
        except FileNotFoundError:
            if not missing_ok:
                raise

    def iterdir(self) -> Iterator[UriPath]:
        import pyarrow.fs as pafs

        for info in self.fs.get_file_info(pafs.FileSelector(self.path, allow_not_found=True)):
            yield self._child(info.path)

    def walk_files(self) -> list[UriPath]:
        """Every file below this folder, sorted by path."""
        import pyarrow.fs as pafs

        infos = self.fs.get_file_info(pafs.FileSelector(self.path, recursive=True, allow_not_found=True))
        return sorted((self._child(i.path) for i in infos if i.type == pafs.FileType.File), key=lambda p: p.path)

    def open(self, mode: str = "rb") -> BinaryIO:
        if mode == "rb":
            return self.fs.open_input_file(self.path)
        if mode == "wb":
            return self.fs.open_output_stream(self.path)
        raise ValueError(f"UriPath.open: mode {mode!r} (rb or wb)")

    def check_writable(self) -> None:
        """Create this folder (a no-op on object stores) and write and delete a probe object in it: permissions are
        only known by trying."""
        probe = self / f".realsr-write-test-{secrets.token_hex(4)}"
        try:
            self.mkdir(parents=True, exist_ok=True)
            with probe.open("wb") as fh:
                fh.write(b"")
            probe.unlink(missing_ok=True)
        except OSError as e:
            raise InvalidInputError(f"cannot write to {self}: {e}; choose another output") from e

    def atomic_write(self, write: Callable[[BinaryIO], None], partial_mark: str) -> None:
        """Write to a hidden object, then move it over this one (see the module)."""
        buf = io.BytesIO()  # encoders may seek; object streams cannot
        write(buf)
        tmp = self.with_name(f".{self.name}{partial_mark}{secrets.token_hex(4)}")
        try:
            with tmp.open("wb") as fh:
                fh.write(buf.getvalue())
            self.fs.move(tmp.path, self.path)
        except BaseException:
            try:
                tmp.unlink(missing_ok=True)
            except OSError:
                pass
            raise
