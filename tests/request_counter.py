"""Counting the HTTP requests ckptguard sends to an S3 server (tests and benchmarks).

botocore emits ``before-send.s3.<Operation>`` before each attempt goes on the wire, so a
handler registered on every client s3fs makes counts what the server really receives,
retries included. :func:`counting` hooks every :class:`FsspecStorage` made while it is
active (managers make their own).
"""

from __future__ import annotations

import collections
import contextlib
import threading
from typing import TYPE_CHECKING, Any

from ckptguard._storage import objectstore

if TYPE_CHECKING:
    from collections.abc import Iterator


class Requests:
    """Requests sent, by S3 operation (thread-safe)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.by_operation: collections.Counter[str] = collections.Counter()

    def hook(self, event_name: str, **_kwargs: Any) -> None:
        with self._lock:
            self.by_operation[event_name.rsplit(".", 1)[-1]] += 1

    @property
    def total(self) -> int:
        with self._lock:
            return sum(self.by_operation.values())

    def take(self) -> dict[str, int]:
        """The counts so far (with "total"), then start again from zero."""
        with self._lock:
            counts = dict(self.by_operation)
            self.by_operation.clear()
        return {**counts, "total": sum(counts.values())}


@contextlib.contextmanager
def counting() -> Iterator[Requests]:
    """Count the requests of every FsspecStorage (on s3://) created inside the block."""
    requests = Requests()
    original = objectstore.FsspecStorage.__init__

    def init(self: objectstore.FsspecStorage, *args: Any, **kwargs: Any) -> None:
        original(self, *args, **kwargs)
        if self.protocol in {"s3", "s3a"}:
            self.fs.connect()
            self.fs.s3.meta.events.register("before-send.s3", requests.hook)

    objectstore.FsspecStorage.__init__ = init  # type: ignore[method-assign]
    try:
        yield requests
    finally:
        objectstore.FsspecStorage.__init__ = original  # type: ignore[method-assign]
