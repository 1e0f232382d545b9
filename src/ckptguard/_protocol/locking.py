"""The root's file lock: serialises commits and cleanup among processes sharing a root.

Processes without a process group (independent jobs, or ranks launched without
torch.distributed) may commit into the same root at the same moment; the lock makes
"check the final name, then rename" one step for everyone who honours it. It is an
flock(2) lock held through an open file, so the kernel releases it when its holder dies:
a crashed saver can never leave the root locked.
"""

from __future__ import annotations

import contextlib
import errno
from typing import TYPE_CHECKING

import filelock

from ckptguard._errors import LockTimeout, storage_error_from_os

if TYPE_CHECKING:
    from collections.abc import Iterator

    from ckptguard._format.layout import RootLayout

__all__ = ["DEFAULT_LOCK_TIMEOUT", "root_lock"]

DEFAULT_LOCK_TIMEOUT = 600.0


@contextlib.contextmanager
def root_lock(layout: RootLayout, timeout: float = DEFAULT_LOCK_TIMEOUT) -> Iterator[None]:
    """Hold ``ROOT/.ckptguard/lock`` (the meta directory must exist)."""
    # thread_local=False and a new FileLock per call: every holder has its own flock on
    # its own file description, so two threads of one process also exclude each other.
    # The lock file is kept (unlinking it on release lets a waiter lock a dead inode), and
    # there is no silent fallback to a lock file that a crashed holder would leave behind.
    lock = filelock.FileLock(
        layout.lock,
        timeout=timeout,
        mode=0o600,
        thread_local=False,
        poll_interval=0.01,
        preserve_lock_file=True,
        fallback_to_soft=False,
    )
    try:
        lock.acquire()
    except filelock.Timeout:
        raise LockTimeout(
            f"could not lock {layout.lock} within {timeout:g}s", path=layout.lock
        ) from None
    except OSError as exc:
        err = storage_error_from_os(exc, "taking the root's lock", layout.lock)
        if exc.errno in {errno.ENOSYS, errno.ENOLCK, errno.EOPNOTSUPP}:
            err.hint = (
                "this filesystem does not support flock(2) locks (Lustre without -o flock, "
                "some NFS setups): enable them, or use a root on another filesystem"
            )
        raise err from exc
    try:
        yield
    finally:
        lock.release()
