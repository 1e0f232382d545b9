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
import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, TypeVar

import tenacity

from ckptguard.errors import StorageError, storage_error_from_os

if TYPE_CHECKING:
    from collections.abc import Callable

__all__ = ["PERMANENT_ERRNOS", "TRANSIENT_ERRNOS", "RetryPolicy", "call_fsync", "call_with_retry"]

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
    """

    deadline: float = 30.0
    initial_wait: float = 0.02
    max_wait: float = 2.0


DEFAULT_RETRY = RetryPolicy()


def call_with_retry(
    fn: Callable[[], T],
    *,
    what: str,
    path: str | None,
    policy: RetryPolicy = DEFAULT_RETRY,
    also_transient: frozenset[int] = frozenset(),
    passthrough: frozenset[int] = frozenset(),
) -> T:
    """Run ``fn``, retrying transient OSErrors; map the final failure to a typed error.

    OSErrors whose errno is in ``passthrough`` (for example EEXIST of a no-replace
    rename, which the caller handles) are re-raised unchanged and never retried.
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

    retrying = tenacity.Retrying(
        retry=tenacity.retry_if_exception(is_transient),
        wait=tenacity.wait_random_exponential(multiplier=policy.initial_wait, max=policy.max_wait),
        stop=tenacity.stop_after_delay(policy.deadline),
        before_sleep=log_retry,
        reraise=True,
    )
    try:
        return retrying(fn)
    except StorageError:
        raise
    except OSError as exc:
        if exc.errno in passthrough:
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
