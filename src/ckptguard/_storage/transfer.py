"""Concurrent transfers to and from object stores, bounded by one setting and by memory.

One :class:`Transfers` per store root (``FsspecStorage``) holds what bounds them all:

- ``max_concurrency`` worker threads: at most that many requests (part uploads, ranged
  reads) of that root are in flight at once, whatever asks for them (a save, a restore, a
  verify, the mirror's concurrent file uploads);
- a :class:`BufferPool` of part-size buffers, at most ``max_concurrency + SPARE_BUFFERS``
  handed out at once: a writer that finds it empty blocks until a part upload returns
  its buffer, so the memory of transfers never grows with the size of a state.

Workers are threads, not coroutines on the store's event loop: each request runs through
the same retry policy as every other store request (``objectstore._retry``: tenacity,
typed errors, the connect budget), so a part or a range that fails transiently is retried
alone; the thread only waits on the store's own event loop, which runs every request.

:class:`ConcurrentUpload` is a ``FileWriter`` that uploads parts concurrently; every byte
is hashed (xxh3-128) in order as it is handed to ``write``. :class:`RangeStream` reads an
object's bytes in ranges fetched concurrently and hands them out in order, so a caller
hashes each range as it arrives, in order. Neither knows which store it talks to: the
store's requests come in as callables (``objectstore.py``).
"""

from __future__ import annotations

import bisect
import collections
import concurrent.futures
import io
import logging
import os
import threading
from typing import TYPE_CHECKING, Any, Protocol

import xxhash

from ckptguard._errors import StorageError
from ckptguard._storage.base import FileDigest
from ckptguard._storage.faults import fault_point

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator

__all__ = [
    "DEFAULT_MAX_CONCURRENCY",
    "MAX_PARTS",
    "PART_SIZE",
    "SPARE_BUFFERS",
    "BufferPool",
    "ConcurrentUpload",
    "PartClient",
    "RangeStream",
    "Transfers",
    "check_max_concurrency",
]

_log = logging.getLogger("ckptguard.transfer")

PART_SIZE = 8 << 20  # one pool buffer; a part and a ranged read (S3's minimum part is 5 MiB)
MAX_PARTS = 10_000  # S3's limit of parts per multipart upload
# From this part on, a part is BIG_PART_BUFFERS buffers (taken from the pool at once): an
# object may grow to 5000 * 8 MiB + 5000 * 32 MiB = 195 GiB (16 MiB parts before: 156 GiB).
BIG_PARTS_FROM = 5_001
BIG_PART_BUFFERS = 4
SPARE_BUFFERS = 2  # one being filled by the writer, one being handed over
DEFAULT_MAX_CONCURRENCY = 16  # chosen by the sweep of benchmarks/bench_s3.py (README)


def check_max_concurrency(value: object) -> int:
    """``value`` as a max_concurrency (an int >= 1), or a ValueError that says so."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(
            f"max_concurrency must be an int >= 1 (requests in flight per store), got {value!r}"
        )
    return value


class BufferPool:
    """Part-size buffers, at most ``limit`` handed out at once.

    :meth:`acquire` blocks while ``limit`` are out (or returns None with ``block=False``).
    Buffers are made as needed and reused while any is out; once all are back the pool
    keeps none, so an idle root holds no transfer memory. ``peak`` is the most ever out.
    """

    def __init__(self, buffer_size: int, limit: int) -> None:
        self.buffer_size, self.limit = buffer_size, limit
        self._cond = threading.Condition()
        self._free: list[bytearray] = []
        self.in_use = 0
        self.peak = 0

    def acquire(self, *, block: bool = True) -> bytearray | None:
        """One buffer (None if none is free and ``block`` is False)."""
        got = self.acquire_many(1, block=block)
        return got[0] if got else None

    def acquire_many(self, count: int, *, block: bool = True) -> list[bytearray]:
        """``count`` buffers at once (all or none: two writers never hold halves)."""
        count = min(count, self.limit)
        with self._cond:
            while self.in_use + count > self.limit:
                if not block:
                    return []
                self._cond.wait()
            self.in_use += count
            self.peak = max(self.peak, self.in_use)
            reused = [self._free.pop() for _ in range(min(count, len(self._free)))]
        return reused + [bytearray(self.buffer_size) for _ in range(count - len(reused))]

    def release(self, buf: bytearray) -> None:
        with self._cond:
            if self.in_use <= 0:  # pragma: no cover - a bug in a caller
                raise RuntimeError("a buffer was returned to the pool twice")
            self.in_use -= 1
            if self.in_use:
                self._free.append(buf)
            else:
                self._free.clear()
            self._cond.notify_all()


class Transfers:
    """One store root's worker threads and buffer pool (see the module docstring)."""

    def __init__(self, max_concurrency: int, part_size: int = PART_SIZE) -> None:
        self.max_concurrency = check_max_concurrency(max_concurrency)
        self.pool = BufferPool(part_size, self.max_concurrency + SPARE_BUFFERS)
        self._executor: concurrent.futures.ThreadPoolExecutor | None = None
        self._lock = threading.Lock()
        self._pid = os.getpid()

    @property
    def part_size(self) -> int:
        return self.pool.buffer_size

    def submit(self, fn: Callable[..., Any], *args: Any) -> concurrent.futures.Future[Any]:
        with self._lock:
            if self._pid != os.getpid():  # a forked child: the parent's threads are not here
                self._pid, self._executor = os.getpid(), None
                self.pool = BufferPool(self.pool.buffer_size, self.pool.limit)
            if self._executor is None:
                self._executor = concurrent.futures.ThreadPoolExecutor(
                    self.max_concurrency, thread_name_prefix="ckptguard-transfer"
                )
            return self._executor.submit(fn, *args)

    def close(self) -> None:
        with self._lock:
            executor, self._executor = self._executor, None
        if executor is not None:
            executor.shutdown(wait=True)


class PartClient(Protocol):
    """One object's multipart requests, each retried by the store (``objectstore.py``)."""

    def start(self) -> str:
        """Create the multipart upload; its upload id."""

    def put_part(self, upload_id: str, number: int, body: io.RawIOBase) -> dict[str, Any]:
        """Upload one part; its entry for the completion (``PartNumber``, ``ETag``)."""

    def complete(self, upload_id: str, parts: list[dict[str, Any]]) -> None: ...
    def abort(self, upload_id: str) -> None: ...
    def put_whole(self, body: io.RawIOBase) -> None:
        """Upload a small object in one request (no multipart upload)."""


class ViewReader(io.RawIOBase):
    """A seekable, read-only file over buffers, in order: a request body without a copy."""

    def __init__(self, views: list[memoryview]) -> None:
        super().__init__()
        self._views = [v for v in views if len(v)]
        self._starts: list[int] = []
        total = 0
        for view in self._views:
            self._starts.append(total)
            total += len(view)
        self._len, self._pos = total, 0

    def __len__(self) -> int:
        return self._len

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def readinto(self, b: Any) -> int:
        out = memoryview(b).cast("B")
        done = 0
        while done < len(out) and self._pos < self._len:
            i = bisect.bisect_right(self._starts, self._pos) - 1
            at = self._pos - self._starts[i]
            n = min(len(out) - done, len(self._views[i]) - at)
            out[done : done + n] = self._views[i][at : at + n]
            done += n
            self._pos += n
        return done

    def read(self, size: int | None = -1) -> bytes:
        left = self._len - self._pos
        out = bytearray(left if size is None or size < 0 else min(size, left))
        n = self.readinto(out)
        return bytes(out[:n])

    def readall(self) -> bytes:
        return self.read(-1)

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self._len}[whence]
        self._pos = max(0, base + offset)
        return self._pos

    def tell(self) -> int:
        return self._pos


class ConcurrentUpload:
    """A FileWriter uploading parts concurrently, hashing every byte as it is handed over.

    Parts are pool buffers, uploaded by the root's workers while the caller fills the
    next one; ``write`` blocks only when the pool is empty. A part that fails transiently
    is retried alone (by ``client``); one that fails for good fails the next ``write`` or
    ``close``, which aborts the multipart upload. A file smaller than a part is one plain
    upload at ``close`` (no multipart upload is created).
    """

    def __init__(self, transfers: Transfers, client: PartClient, path: str) -> None:
        self._transfers, self._client, self._path = transfers, client, path
        self._hasher = xxhash.xxh3_128()
        self._size = 0
        self._filling: list[bytearray] = []  # the part being filled (its buffers)
        self._index = 0  # the buffer of _filling being filled
        self._filled = 0  # bytes in it
        self._upload_id: str | None = None
        self._parts: list[concurrent.futures.Future[dict[str, Any]]] = []
        self._failed: BaseException | None = None
        self._done = False

    def _buffers_per_part(self) -> int:
        return BIG_PART_BUFFERS if len(self._parts) + 1 >= BIG_PARTS_FROM else 1

    def write(self, data: bytes | bytearray | memoryview) -> None:
        view = memoryview(data).cast("B")
        self._hasher.update(view)
        self._size += len(view)
        size = self._transfers.pool.buffer_size
        while view:
            self._raise_failed()
            if not self._filling:  # a new part: all its buffers at once
                self._filling = self._transfers.pool.acquire_many(self._buffers_per_part())
                self._index = self._filled = 0
            buf = self._filling[self._index]
            n = min(len(view), size - self._filled)
            buf[self._filled : self._filled + n] = view[:n]
            self._filled += n
            view = view[n:]
            if self._filled == size:
                if self._index + 1 == len(self._filling):
                    self._send()
                else:
                    self._index, self._filled = self._index + 1, 0
            fault_point("remote.uploading")

    def _body(self) -> ViewReader:
        views = [memoryview(b) for b in self._filling[: self._index]]
        views.append(memoryview(self._filling[self._index])[: self._filled])
        return ViewReader(views)

    def _send(self) -> None:
        """Hand the part being filled to a worker; its buffers return to the pool after."""
        if self._upload_id is None:
            self._upload_id = self._client.start()
        number = len(self._parts) + 1
        if number > MAX_PARTS:
            raise StorageError(
                f"upload of {self._path}: over {MAX_PARTS} parts (larger than an object "
                "store object may be)",
                path=self._path,
            )
        buffers, body = self._filling, self._body()
        self._filling, self._index, self._filled = [], 0, 0
        future = self._transfers.submit(self._client.put_part, self._upload_id, number, body)
        self._parts.append(future)

        def settle(done: concurrent.futures.Future[dict[str, Any]]) -> None:
            for buf in buffers:
                self._transfers.pool.release(buf)
            if not done.cancelled() and done.exception() is not None:
                self._failed = self._failed or done.exception()

        future.add_done_callback(settle)

    def close(self) -> FileDigest:
        if self._done:
            raise ValueError(f"{self._path}: the upload is closed already")
        try:
            self._raise_failed()
            if self._upload_id is None:
                self._client.put_whole(self._body() if self._filling else ViewReader([]))
                self._release_filling()
            else:
                if self._filling:
                    self._send()
                parts = [future.result() for future in self._parts]
                self._client.complete(self._upload_id, parts)
        except BaseException:
            self.abort()
            raise
        self._done = True
        return FileDigest(self._size, self._hasher.hexdigest())

    def _raise_failed(self) -> None:
        if self._failed is not None:
            raise self._failed

    def _release_filling(self) -> None:
        for buf in self._filling:
            self._transfers.pool.release(buf)
        self._filling, self._index, self._filled = [], 0, 0

    def abort(self) -> None:
        """Stop: no part is uploaded after this returns, and the multipart upload is aborted."""
        if self._done:
            return
        self._done = True
        for future in self._parts:
            future.cancel()
        concurrent.futures.wait(self._parts)
        self._release_filling()
        if self._upload_id is not None:
            try:
                self._client.abort(self._upload_id)
            except Exception as exc:  # marker.clean_store aborts it later
                _log.warning("could not abort the upload of %s: %s", self._path, exc)

    def __enter__(self) -> ConcurrentUpload:
        return self

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        if exc_type is not None:
            self.abort()


class RangeStream:
    """The bytes ``[start, end)`` of an object, fetched concurrently, handed out in order.

    ``fetch(offset, view)`` fills ``view`` with the bytes at ``offset`` (a ranged read,
    retried by the store). Up to ``max_concurrency`` ranges are in flight, each in a pool
    buffer; iterating yields each range's bytes in order, valid until the next one is
    asked for. A stream only blocks on the pool while it holds no buffer: the buffers it
    holds come back only as it is consumed.
    """

    def __init__(
        self,
        transfers: Transfers,
        fetch: Callable[[int, memoryview], None],
        start: int,
        end: int,
        *,
        range_size: int | None = None,
    ) -> None:
        self._transfers, self._fetch = transfers, fetch
        self.start, self.end = start, end
        size = transfers.pool.buffer_size
        self._range = min(size, range_size or size)

    def __iter__(self) -> Iterator[memoryview]:
        pool = self._transfers.pool
        pending: collections.deque[tuple[int, bytearray, concurrent.futures.Future[None]]] = (
            collections.deque()
        )
        offset = self.start
        try:
            while pending or offset < self.end:
                while offset < self.end and len(pending) < self._transfers.max_concurrency:
                    buf = pool.acquire(block=not pending)
                    if buf is None:
                        break
                    n = min(self._range, self.end - offset)
                    view = memoryview(buf)[:n]
                    pending.append((n, buf, self._transfers.submit(self._fetch, offset, view)))
                    offset += n
                n, buf, future = pending.popleft()
                try:
                    future.result()
                    yield memoryview(buf)[:n]
                finally:
                    pool.release(buf)
        finally:
            for _, _, future in pending:
                future.cancel()
            concurrent.futures.wait([future for _, _, future in pending])
            for _, buf, _ in pending:
                pool.release(buf)
