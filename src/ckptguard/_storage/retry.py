"""Retries for transient filesystem errors, and the line between transient and permanent.

Transient (retried with exponential backoff, jitter and a deadline):
- EBUSY, EAGAIN, ESTALE, EINTR, ETIMEDOUT: busy servers, stale NFS handles, interrupted calls;
- ENOTEMPTY and ENOENT, but only where the caller says so (rename and rmdir on NFS): a
  silly-renamed ``.nfsXXXX`` file or a lagging directory cache makes them fail for a moment.

Permanent (never retried; the save is aborted and a typed error raised):
- EIO, ENOSPC, EDQUOT, EROFS, EACCES, EPERM, and everything not listed above.
- Any error from fsync: after a failed fsync the kernel may have dropped the dirty pages
  and a second fsync can report success for data that is gone ("fsyncgate"), so we never
  fsync the same data again; the caller aborts instead.
"""

from __future__ import annotations

import errno
import functools
import logging
import os
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

import tenacity

from ckptguard._errors import (
    CheckpointError,
    StorageError,
    TransientStorageError,
    storage_error_from_os,
)

if TYPE_CHECKING:
    from collections.abc import Callable

    from ckptguard._storage.base import CheckpointTree, FileDigest, FileWriter, Storage

__all__ = [
    "PERMANENT_ERRNOS",
    "TRANSIENT_ERRNOS",
    "BackgroundFsyncs",
    "RetryPolicy",
    "RetryingStorage",
    "call_fsync",
    "call_save_with_retry",
    "call_with_retry",
    "with_retries",
]

_log = logging.getLogger("ckptguard.retry")

T = TypeVar("T")

TRANSIENT_ERRNOS = frozenset(
    {errno.EBUSY, errno.EAGAIN, errno.ESTALE, errno.EINTR, errno.ETIMEDOUT}
)
PERMANENT_ERRNOS = frozenset(
    {errno.EIO, errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM}
)
# Only on rename and rmdir, where NFS visibility lag produces them for a moment.
NFS_LAG_ERRNOS = frozenset({errno.ENOTEMPTY, errno.ENOENT})


@dataclass(frozen=True)
class RetryPolicy:
    """How long and how fast to retry transient errors.

    Attributes:
        deadline: seconds after the first failure when we give up and raise.
        initial_wait: the first backoff, doubled each attempt, with full jitter.
        max_wait: the cap of a single backoff.
        connect_budget: seconds an object store's endpoint may stay unreachable (refused
            or unanswered connections) before :class:`StorageUnreachable` is raised; the
            same on every backend (a local filesystem never needs it).
    """

    deadline: float = 30.0
    initial_wait: float = 0.02
    max_wait: float = 2.0
    connect_budget: float = 5.0


DEFAULT_RETRY = RetryPolicy()


def _retrying(
    retry_if: Callable[[BaseException], bool],
    policy: RetryPolicy,
    log: Callable[[tenacity.RetryCallState], None],
) -> tenacity.Retrying:
    """Exponential backoff with full jitter, until ``policy.deadline``; re-raises the last."""
    return tenacity.Retrying(
        retry=tenacity.retry_if_exception(retry_if),
        wait=tenacity.wait_random_exponential(multiplier=policy.initial_wait, max=policy.max_wait),
        stop=tenacity.stop_after_delay(policy.deadline),
        before_sleep=log,
        reraise=True,
    )


def call_with_retry(
    fn: Callable[[], T],
    *,
    what: str,
    path: str | None,
    policy: RetryPolicy = DEFAULT_RETRY,
    also_transient: frozenset[int] = frozenset(),
    passthrough: frozenset[int] = frozenset(),
    map_permanent: bool = True,
) -> T:
    """Run ``fn``, retrying transient OSErrors; map the final failure to a typed error.

    OSErrors whose errno is in ``passthrough`` (for example EEXIST of a no-replace
    rename, which the caller handles) are re-raised unchanged and never retried; with
    ``map_permanent=False``, so is every error that is not transient.
    """
    transient = TRANSIENT_ERRNOS | also_transient

    def is_transient(exc: BaseException) -> bool:
        return (
            isinstance(exc, OSError)
            and not isinstance(exc, StorageError)
            and exc.errno in transient
            and exc.errno not in passthrough
        )

    def log_retry(state: tenacity.RetryCallState) -> None:
        exc = state.outcome.exception() if state.outcome else None
        _log.warning("%s on %s failed (%s); retry %d", what, path, exc, state.attempt_number)

    try:
        return _retrying(is_transient, policy, log_retry)(fn)
    except StorageError:
        raise
    except OSError as exc:
        if exc.errno in passthrough or (not map_permanent and not is_transient(exc)):
            raise
        raise storage_error_from_os(exc, what, path, transient=is_transient(exc)) from exc


def call_fsync(fn: Callable[[], None], *, what: str, path: str) -> None:
    """Run an fsync step once: an fsync error is never retried (see module docstring)."""
    try:
        fn()
    except StorageError:
        raise
    except OSError as exc:
        raise storage_error_from_os(exc, what, path) from exc


class BackgroundFsyncs:
    """fsync files on worker threads while the caller writes or hashes the next ones.

    The disk writes back one file while the CPU works on the next: for large files the
    cost is about the larger of the two, not their sum. On a clean exit every fsync is
    waited for, and a failure raised typed (never retried, see the module docstring); on
    an exception the ones not started are cancelled.
    """

    def __init__(self, storage: Storage, *, workers: int) -> None:
        self._storage = storage
        self._pool = ThreadPoolExecutor(max(1, workers), thread_name_prefix="ckptguard-fsync")
        self._pending: list[tuple[str, Future[None]]] = []

    def submit(self, path: str) -> None:
        self._pending.append((path, self._pool.submit(self._storage.fsync_file, path)))

    def __enter__(self) -> BackgroundFsyncs:
        return self

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        try:
            if exc_type is not None:
                for _, future in self._pending:
                    future.cancel()
                return
            for path, future in self._pending:
                call_fsync(future.result, what="fsync file", path=path)
        finally:
            self._pool.shutdown(wait=True)


class RetryingStorage:
    """A Storage whose metadata operations retry transient errors (:func:`with_retries`).

    Retried: make_dir, open_write (the create), list_dir, exists, walk_files, set_mode,
    read_bytes, hash_file without fsync, remove_file, remove_tree: each either happened
    or not, so running it again is exact. Not retried here: the data path (write, close,
    write_bytes, fsync_file, fsync_dir, hash_file with fsync: see the module docstring on
    fsync, and a failed write may have written part of its bytes) and rename_noreplace,
    whose callers retry it with the errnos that only a rename may treat as transient.
    """

    def __init__(self, inner: Storage, policy: RetryPolicy) -> None:
        self.inner, self.policy = inner, policy

    def _retry(self, fn: Callable[[], T], what: str, path: str) -> T:
        # Permanent errors pass through unchanged (callers handle ENOENT, EEXIST...); a
        # transient one that outlives the deadline becomes a TransientStorageError.
        return call_with_retry(fn, what=what, path=path, policy=self.policy, map_permanent=False)

    def make_dir(self, path: str, *, mode: int = 0o700, exist_ok: bool = False) -> None:
        self._retry(
            functools.partial(self.inner.make_dir, path, mode=mode, exist_ok=exist_ok),
            "create directory",
            path,
        )

    def open_write(self, path: str, *, fsync: bool = True) -> FileWriter:
        return self._retry(
            functools.partial(self.inner.open_write, path, fsync=fsync), "create file", path
        )

    def write_bytes(self, path: str, data: bytes, *, fsync: bool = True) -> FileDigest:
        return self.inner.write_bytes(path, data, fsync=fsync)

    def read_bytes(self, path: str, *, limit: int) -> bytes:
        return self._retry(
            functools.partial(self.inner.read_bytes, path, limit=limit), "read file", path
        )

    def hash_file(
        self, path: str, *, fsync: bool = False, progress: Callable[[int], None] | None = None
    ) -> FileDigest:
        if fsync:
            return self.inner.hash_file(path, fsync=True, progress=progress)
        return self._retry(
            functools.partial(self.inner.hash_file, path, progress=progress), "read file", path
        )

    def fsync_file(self, path: str) -> None:
        self.inner.fsync_file(path)

    def walk_files(self, path: str) -> tuple[list[str], list[str]]:
        return self._retry(functools.partial(self.inner.walk_files, path), "list files", path)

    def fsync_dir(self, path: str) -> None:
        self.inner.fsync_dir(path)

    def set_mode(self, path: str, mode: int) -> None:
        self._retry(functools.partial(self.inner.set_mode, path, mode), "set mode", path)

    def rename_noreplace(self, src: str, dst: str) -> None:
        self.inner.rename_noreplace(src, dst)

    def list_dir(self, path: str) -> list[str]:
        return self._retry(functools.partial(self.inner.list_dir, path), "list directory", path)

    def exists(self, path: str) -> bool:
        return self._retry(functools.partial(self.inner.exists, path), "look up", path)

    def remove_tree(self, path: str) -> None:
        self._retry(functools.partial(self.inner.remove_tree, path), "remove", path)

    def remove_file(self, path: str) -> None:
        self._retry(functools.partial(self.inner.remove_file, path), "remove file", path)

    def open_tree(self, path: str) -> CheckpointTree:
        return self._retry(functools.partial(self.inner.open_tree, path), "open checkpoint", path)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


def with_retries(storage: Storage, policy: RetryPolicy = DEFAULT_RETRY) -> Storage:
    """``storage`` with its metadata operations retried (once: wrapping twice is a no-op)."""
    if isinstance(storage, RetryingStorage):
        return storage
    return RetryingStorage(storage, policy)


def call_save_with_retry(fn: Callable[[], T], *, final: str, policy: RetryPolicy) -> T:
    """Run a whole save again, in a fresh staging dir, after a transient error aborted it.

    Transient errors on the data path (a write, an fsync) are not retried where they
    happen (see the module docstring); the aborted attempt's staging is removed, so a new
    attempt writes and fsyncs everything anew. Only before the commit: once ``final``
    exists the error is raised, whatever it is. A raw OSError that ends the save is
    raised as the typed StorageError for its errno.
    """

    def redo(exc: BaseException) -> bool:
        return (
            isinstance(exc, OSError)
            and not isinstance(exc, TransientStorageError)  # already retried to the deadline
            and exc.errno in TRANSIENT_ERRNOS
            and not os.path.lexists(final)
        )

    def log_retry(state: tenacity.RetryCallState) -> None:
        exc = state.outcome.exception() if state.outcome else None
        _log.warning(
            "save of %s aborted (%s); saving again, attempt %d",
            final,
            exc,
            state.attempt_number + 1,
        )

    try:
        return _retrying(redo, policy, log_retry)(fn)
    except CheckpointError:  # typed already (a CommitConflict is an OSError too)
        raise
    except OSError as exc:
        raise storage_error_from_os(exc, "save", final, transient=redo(exc)) from exc
