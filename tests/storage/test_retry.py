from __future__ import annotations

import errno

import pytest

import ckptguard
from ckptguard._storage.retry import NFS_LAG_ERRNOS, RetryPolicy, call_fsync, call_with_retry

FAST = RetryPolicy(deadline=5.0, initial_wait=0.001, max_wait=0.01)


class Flaky:
    """Fails with ``code`` for the first ``failures`` calls, then returns "done"."""

    def __init__(self, code: int, failures: int) -> None:
        self.code, self.failures, self.calls = code, failures, 0

    def __call__(self) -> str:
        self.calls += 1
        if self.calls <= self.failures:
            raise OSError(self.code, "injected", "/p")
        return "done"


@pytest.mark.parametrize("code", [errno.EBUSY, errno.EAGAIN, errno.ESTALE, errno.ETIMEDOUT])
def test_transient_errors_are_retried(code: int) -> None:
    flaky = Flaky(code, 3)
    assert call_with_retry(flaky, what="op", path="/p", policy=FAST) == "done"
    assert flaky.calls == 4


@pytest.mark.parametrize(
    ("code", "cls"),
    [
        (errno.EIO, ckptguard.StorageError),
        (errno.ENOSPC, ckptguard.StorageFull),
        (errno.EDQUOT, ckptguard.StorageFull),
        (errno.EROFS, ckptguard.ReadOnlyStorage),
    ],
)
def test_permanent_errors_fail_at_once_typed(code: int, cls: type) -> None:
    flaky = Flaky(code, 1)
    with pytest.raises(cls) as info:
        call_with_retry(flaky, what="write file", path="/p", policy=FAST)
    assert flaky.calls == 1
    assert type(info.value) is cls
    assert isinstance(info.value.__cause__, OSError)


def test_nfs_lag_errors_only_where_asked() -> None:
    flaky = Flaky(errno.ENOTEMPTY, 2)
    with pytest.raises(ckptguard.StorageError):
        call_with_retry(flaky, what="rename", path="/p", policy=FAST)
    assert flaky.calls == 1
    flaky = Flaky(errno.ENOTEMPTY, 2)
    result = call_with_retry(
        flaky, what="rename", path="/p", policy=FAST, also_transient=NFS_LAG_ERRNOS
    )
    assert result == "done"
    assert flaky.calls == 3


def test_passthrough_is_not_retried_nor_wrapped() -> None:
    flaky = Flaky(errno.EEXIST, 1)
    with pytest.raises(FileExistsError) as info:
        call_with_retry(
            flaky, what="rename", path="/p", policy=FAST, passthrough=frozenset({errno.EEXIST})
        )
    assert not isinstance(info.value, ckptguard.CheckpointError)
    assert flaky.calls == 1


def test_deadline_gives_transient_storage_error() -> None:
    flaky = Flaky(errno.EBUSY, 10**9)
    policy = RetryPolicy(deadline=0.05, initial_wait=0.001, max_wait=0.005)
    with pytest.raises(ckptguard.TransientStorageError) as info:
        call_with_retry(flaky, what="rename", path="/p", policy=policy)
    assert flaky.calls > 1
    assert "EBUSY" in str(info.value)


def test_fsync_errors_are_never_retried() -> None:
    calls = 0

    def failing_fsync() -> None:
        nonlocal calls
        calls += 1
        raise OSError(errno.EAGAIN, "even a transient-looking fsync error")

    with pytest.raises(ckptguard.StorageError):
        call_fsync(failing_fsync, what="fsync", path="/p")
    assert calls == 1
