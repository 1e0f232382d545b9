"""DCP's file-system writer and reader, with ckptguard's storage as the file system.

As DCP's own ``FsspecWriter`` does, :class:`StoreWriter` and :class:`StoreReader` are
DCP's ``FileSystemWriter``/``FileSystemReader`` with ``self.fs`` swapped: DCP keeps its
planner, its file layout (one ``__<rank>_0.distcp`` per rank and one ``.metadata``) and
its resharding; only the bytes go through ckptguard's :class:`Storage`, the same on a
POSIX directory and on an object store.

What the writer guarantees:
- every object is written with ``Storage.open_write`` under the save's own staging path
  (a 0700 staging dir, or a fresh ``<name>/<save id>/`` prefix on a store), hashed
  (xxh3-128) as it is written; ``written`` holds each object's size and checksum for the
  transaction to gather into the manifest; nothing is read back;
- an object whose write fails is aborted (a multipart upload is discarded);
- DCP's ``.metadata`` is written once under its final name: DCP writes a temp file and
  renames it, which a store cannot do, and nothing under a save's staging path is
  visible before ckptguard's commit anyway.

What the reader guarantees:
- it opens only the files that ``verified`` lists (the checkpoint's manifest, checked
  before the load) and reads each item DCP asks for with one ranged read
  (``Source.pread_into``) of exactly its bytes; never a local path standing for a URL.
"""

from __future__ import annotations

import io
import pickle
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, cast

from torch.distributed.checkpoint.filesystem import (
    CURRENT_DCP_VERSION,
    FileSystem,
    FileSystemReader,
    FileSystemWriter,
)

from ckptguard._errors import CorruptCheckpoint

if TYPE_CHECKING:
    import os
    from collections.abc import Callable, Collection, Generator

    from torch.distributed.checkpoint.metadata import Metadata
    from torch.distributed.checkpoint.storage import WriteResult

    from ckptguard._storage.base import FileDigest, FileWriter, Source, Storage

__all__ = ["METADATA_NAME", "StoreReader", "StoreWriter"]

METADATA_NAME = ".metadata"  # DCP's name for its (pickled) metadata file
_METADATA_BUFFER = 4 << 20  # bytes per read of .metadata (DCP unpickles it in small reads)


class _WriteStream(io.RawIOBase):
    """What DCP writes an object through: ``write`` and ``tell`` over a ``FileWriter``."""

    def __init__(self, writer: FileWriter) -> None:
        super().__init__()
        self._writer = writer
        self._position = 0

    def writable(self) -> bool:
        return True

    def write(self, data: Any) -> int:
        size = memoryview(data).nbytes
        self._writer.write(data)
        self._position += size
        return size

    def tell(self) -> int:
        return self._position


class _ReadStream(io.RawIOBase):
    """One verified file, read by ranges (``readinto`` for pickle, ``read_range`` for items)."""

    def __init__(self, source: Source) -> None:
        super().__init__()
        self.source = source
        self._position = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._position

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._position, io.SEEK_END: self.source.size}
        self._position = max(0, base[whence] + offset)
        return self._position

    def readinto(self, buffer: Any) -> int:
        view = memoryview(buffer).cast("B")
        count = max(0, min(len(view), self.source.size - self._position))
        if count:
            self.source.pread_into(view[:count], self._position)
        self._position += count
        return count

    def read_range(self, offset: int, length: int) -> io.BytesIO:
        """Bytes ``[offset, offset + length)`` in one ranged read, as a seekable file."""
        if offset < 0 or length < 0 or offset + length > self.source.size:
            raise CorruptCheckpoint(
                f"{self.source.path}: DCP's metadata names bytes {offset}..{offset + length}, "
                f"past its end ({self.source.size} bytes)",
                path=self.source.path,
            )
        chunk = io.BytesIO()
        if length:
            chunk.seek(length - 1)
            chunk.write(b"\0")  # sized once, zero-filled: filled in place, no second copy
            with chunk.getbuffer() as view:
                self.source.pread_into(view, offset)
            chunk.seek(0)
        return chunk


class _StoreFileSystem(FileSystem):
    """DCP's file-system interface over one staging path or one verified checkpoint.

    A ``FileSystem`` (DCP's local one) only because DCP's writer and reader type
    ``self.fs`` as one; every method is replaced, none touches a local disk.
    """

    def __init__(
        self,
        root: str,
        *,
        storage: Storage | None = None,
        opener: Callable[[str], Source] | None = None,
        verified: Collection[str] = (),
    ) -> None:
        self.root = root.rstrip("/")
        self.storage = storage  # writing
        self.opener, self.verified = opener, frozenset(verified)  # reading
        self.written: dict[str, FileDigest] = {}

    def _rel(self, path: str | os.PathLike[str]) -> str:
        text = str(path)
        if not text.startswith(self.root + "/"):
            raise ValueError(f"{text} lies outside the checkpoint {self.root}")
        return text[len(self.root) + 1 :]

    @contextmanager
    def create_stream(
        self, path: str | os.PathLike[str], mode: str
    ) -> Generator[io.IOBase, None, None]:
        rel = self._rel(path)
        if mode == "wb" and self.storage is not None:
            writer = self.storage.open_write(str(path), fsync=True)
            try:
                yield _WriteStream(writer)
            except BaseException:
                writer.abort()
                raise
            self.written[rel] = writer.close()
        elif mode == "rb" and self.opener is not None:
            if rel not in self.verified:
                raise CorruptCheckpoint(
                    f"{path}: DCP's metadata names a file the manifest does not list",
                    path=str(path),
                )
            source = self.opener(rel)
            try:
                # Buffered for pickle's small reads of .metadata; items bypass the buffer.
                yield io.BufferedReader(_ReadStream(source), buffer_size=_METADATA_BUFFER)
            finally:
                source.close()
        else:
            raise ValueError(f"{path}: mode {mode!r} is not open to this {type(self).__name__}")

    def concat_path(self, path: str | os.PathLike[str], suffix: str) -> str:
        return f"{str(path).rstrip('/')}/{suffix}"

    def init_path(self, path: str | os.PathLike[str]) -> str:
        return str(path)

    def rename(self, path: str | os.PathLike[str], new_path: str | os.PathLike[str]) -> None:
        raise NotImplementedError(f"{path} -> {new_path}: objects are written under their names")

    def mkdir(self, path: str | os.PathLike[str]) -> None:
        del path  # the transaction made the staging dir (a store has no directories)

    @classmethod
    def validate_checkpoint_id(cls, checkpoint_id: str | os.PathLike[str]) -> bool:
        del checkpoint_id
        return False  # only ever handed to DCP as an instance, never picked by it

    def exists(self, path: str | os.PathLike[str]) -> bool:
        if self.storage is None:
            return self._rel(path) in self.verified
        return self.storage.exists(str(path))

    def rm_file(self, path: str | os.PathLike[str]) -> None:
        if self.storage is None:
            raise ValueError(f"{path}: a checkpoint being read is never changed")
        self.storage.remove_file(str(path))

    def ls(self, path: str | os.PathLike[str]) -> list[str]:
        raise NotImplementedError(f"{path}: DCP's writer and reader never list")


class StoreWriter(FileSystemWriter):
    """DCP's writer with ckptguard's storage: every rank writes its shards under ``path``."""

    def __init__(self, storage: Storage, path: str) -> None:
        # sync_files=False: DCP would fsync a stream it thinks is a file, and fall back to
        # os.sync() of the whole machine; open_write(fsync=True) makes each file durable.
        # overwrite=False: a .metadata already under a fresh staging path is a bug, raised.
        super().__init__(path, single_file_per_rank=True, sync_files=False, overwrite=False)
        self.fs = _StoreFileSystem(path, storage=storage)
        self.path = path

    @property
    def written(self) -> dict[str, FileDigest]:
        """What this rank wrote: path relative to the staging path -> size and checksum."""
        return dict(cast("_StoreFileSystem", self.fs).written)

    def finish(self, metadata: Metadata, results: list[list[WriteResult]]) -> None:
        """The coordinator (rank 0) only: DCP's ``.metadata``, written under its name."""
        metadata.version = CURRENT_DCP_VERSION
        metadata.storage_data = {wr.index: wr.storage_data for wrs in results for wr in wrs}
        metadata.storage_meta = self.storage_meta()
        with self.fs.create_stream(self.fs.concat_path(self.path, METADATA_NAME), "wb") as out:
            pickle.dump(metadata, out)


class StoreReader(FileSystemReader):
    """DCP's reader over one verified checkpoint: only the files ``verified`` lists."""

    def __init__(
        self, path: str, opener: Callable[[str], Source], verified: Collection[str]
    ) -> None:
        super().__init__(path)
        self.fs = _StoreFileSystem(path, opener=opener, verified=verified)
        self.path = path

    def _slice_file(self, file: Any, sinfo: Any) -> Any:
        # One ranged read per item: exactly its bytes, never the whole file.
        stream = cast("_ReadStream", file.raw)
        return stream.read_range(int(sinfo.offset), int(sinfo.length))
