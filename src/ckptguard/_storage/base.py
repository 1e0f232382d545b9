"""The storage contract: what a checkpoint needs of a filesystem or an object store.

Two implementations: ``LocalStorage`` (POSIX, ``local.py``) and ``FsspecStorage``
(s3://, gs://, memory://... through fsspec, ``objectstore.py``). Everything above this
layer talks to :class:`Storage` and never asks which one it has; what differs in the
*commit* is a commit strategy (``ckptguard/_protocol/strategy.py``).

Order of calls for one save, all made by the committing process unless noted:

1. ``make_dir(staging, mode=0o700)``                          stage
2. ``open_write`` / ``write_bytes`` (any writer, any rank)    write: checksum while writing
   ``walk_files`` + ``hash_file(fsync=True)``                 seal: files written by others
3. ``write_bytes(manifest)``                                  seal
4. ``rename_noreplace(staging, final)`` (POSIX) or a          commit: the atomic step
   create-only ``write_bytes(manifest)`` (object stores)
5. ``fsync_dir(root)``, ``remove_tree(trash entry)``          publish

Reading a checkpoint (verify, restore, inspect) goes through :meth:`Storage.open_tree`,
which never follows a link. Paths are absolute, '/'-separated paths or URLs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

if TYPE_CHECKING:
    from collections.abc import Callable

__all__ = [
    "CheckpointTree",
    "FileDigest",
    "FileWriter",
    "Source",
    "Storage",
    "innermost",
    "is_url",
]

READ_CHUNK = 8 * 1024 * 1024


def innermost(storage: Any) -> Any:
    """The storage under any wrappers (retries, fault injection): each keeps it as ``inner``."""
    while hasattr(storage, "inner"):
        storage = storage.inner
    return storage


def is_url(root: str) -> bool:
    """Whether ``root`` names an fsspec store rather than a local path (file:// is local)."""
    return "://" in root and not root.startswith("file://")


@dataclass(frozen=True)
class FileDigest:
    """Size and xxh3-128 hex digest of a file's bytes."""

    size: int
    checksum: str


class FileWriter(Protocol):
    """A file being written: ``write`` any number of times, then ``close`` (or ``abort``)."""

    def write(self, data: bytes | bytearray | memoryview) -> None: ...
    def close(self) -> FileDigest: ...
    def abort(self) -> None: ...


class Source(Protocol):
    """One file of a checkpoint, open for reading.

    Reads fill their buffer or raise ``CorruptCheckpoint`` (a file shorter than its
    manifest and header say).
    """

    path: str

    @property
    def size(self) -> int: ...
    def pread_into(self, view: memoryview, offset: int) -> None: ...
    def read_at_most(self, limit: int, offset: int = 0) -> bytes: ...
    def checksum(self) -> str: ...
    def close(self) -> None: ...


class CheckpointTree(Protocol):
    """One checkpoint's files, read-only, never through a link (verify and the reader).

    Order of calls: ``read_small`` (the manifest), then ``entries`` and ``digest``/``open``
    for listed files, then ``close``.
    """

    path: str

    def read_small(self, rel: str, limit: int) -> bytes:
        """A whole small file (ValueError if over ``limit``, UnsupportedFile if not a file)."""

    def entries(self, under: str, problem: Callable[[str], None]) -> dict[str, int]:
        """Every regular file whose relative path starts with ``under``: path -> size.

        Anything else found there (a link, a device, a too-deep tree) goes to ``problem``.
        The manifest is an entry like any other file (verify sets it apart).
        """

    def digest(self, rel: str, progress: Callable[[int], None] | None = None) -> FileDigest:
        """Stream one file through xxh3-128."""

    def open(self, rel: str) -> Source:
        """Open one file for reading."""

    def close(self) -> None: ...


@runtime_checkable
class Storage(Protocol):
    """A filesystem or object store as the commit protocol needs it."""

    def make_dir(self, path: str, *, mode: int = 0o700, exist_ok: bool = False) -> None:
        """Create one directory with ``mode`` exactly (no-op on object stores)."""

    def open_write(self, path: str, *, fsync: bool = True) -> FileWriter:
        """Create a file; its digest is computed while writing.

        On a filesystem never over an existing one (FileExistsError). An object store
        replaces an object of that name: where that matters (the commit marker) the
        strategy writes with a create-only conditional write instead; every other object
        of a save lies under the save's own fresh prefix.
        """

    def write_bytes(self, path: str, data: bytes, *, fsync: bool = True) -> FileDigest:
        """Create a file holding ``data`` (an existing one: as for ``open_write``)."""

    def read_bytes(self, path: str, *, limit: int) -> bytes:
        """Read a regular file of at most ``limit`` bytes (never through a symlink)."""

    def hash_file(
        self, path: str, *, fsync: bool = False, progress: Callable[[int], None] | None = None
    ) -> FileDigest:
        """Digest a regular file by streaming it; fsync it too if asked."""

    def fsync_file(self, path: str) -> None:
        """Make a regular file's data durable (never through a symlink)."""

    def walk_files(self, path: str) -> tuple[list[str], list[str]]:
        """(files, dirs) under ``path`` as relative POSIX paths; refuses symlinks and specials."""

    def fsync_dir(self, path: str) -> None:
        """Make a directory's entries durable (no-op on object stores)."""

    def set_mode(self, path: str, mode: int) -> None:
        """Set a directory's permission bits (no-op where the store has none)."""

    def rename_noreplace(self, src: str, dst: str) -> None:
        """Rename ``src`` to ``dst``; FileExistsError if ``dst`` exists (POSIX only)."""

    def list_dir(self, path: str) -> list[str]:
        """Names in a directory, sorted; [] if it does not exist."""

    def exists(self, path: str) -> bool:
        """Whether anything (even a dangling symlink) has that name."""

    def remove_tree(self, path: str) -> None:
        """Remove a file or a directory tree; a symlink is removed, never followed."""

    def remove_file(self, path: str) -> None:
        """Remove one file; missing is fine."""

    def open_tree(self, path: str) -> CheckpointTree:
        """Open a checkpoint for reading; FileNotFoundError if there is none at ``path``."""
