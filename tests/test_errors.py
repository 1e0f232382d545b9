from __future__ import annotations

import errno
import pickle

import pytest

import ckptguard
from ckptguard import _errors as errors

ALL_ERRORS = [
    getattr(errors, name) for name in errors.__all__ if isinstance(getattr(errors, name), type)
]


def test_every_error_is_a_checkpoint_error() -> None:
    assert ALL_ERRORS
    for cls in ALL_ERRORS:
        assert issubclass(cls, ckptguard.CheckpointError)
        assert issubclass(cls, Exception)
        assert not issubclass(ckptguard.CheckpointError, BaseException) or issubclass(
            ckptguard.CheckpointError, Exception
        )


@pytest.mark.parametrize(
    ("cls", "builtin"),
    [
        (ckptguard.CommitConflict, FileExistsError),
        (ckptguard.CorruptCheckpoint, ValueError),
        (ckptguard.UnsafeManifest, ValueError),
        (ckptguard.UnsafeManifest, ckptguard.CorruptCheckpoint),
        (ckptguard.CheckpointNotFound, FileNotFoundError),
        (ckptguard.NoValidCheckpoint, FileNotFoundError),
        (ckptguard.LockTimeout, TimeoutError),
        (ckptguard.StorageError, OSError),
        (ckptguard.StorageFull, OSError),
        (ckptguard.ReadOnlyStorage, OSError),
        (ckptguard.StoragePermissionError, PermissionError),
        (ckptguard.TransientStorageError, OSError),
        (ckptguard.InvalidCheckpointName, ValueError),
        (ckptguard.UnsupportedFile, ValueError),
        (ckptguard.RootNotADirectory, NotADirectoryError),
        (ckptguard.RootNotADirectory, ckptguard.UnsupportedRoot),
    ],
)
def test_errors_inherit_the_builtin_they_resemble(cls: type, builtin: type) -> None:
    assert issubclass(cls, builtin)


@pytest.mark.parametrize("cls", ALL_ERRORS)
def test_errors_pickle_with_their_fields(cls: type[ckptguard.CheckpointError]) -> None:
    exc = cls("it broke", path="/runs/x/checkpoint-3", failures={1: "boom"})
    clone = pickle.loads(pickle.dumps(exc))  # noqa: S301 - our own object, round trip
    assert type(clone) is cls
    assert clone.path == "/runs/x/checkpoint-3"
    assert clone.failures == {1: "boom"}
    assert str(clone) == str(exc)


def test_message_names_path_hint_and_failures() -> None:
    exc = ckptguard.StorageFull(
        "no space", path="/data/run", errno=errno.ENOSPC, bytes_needed=10, failures={3: "x"}
    )
    text = str(exc)
    assert "/data/run" in text
    assert "free space" in text  # the hint says what to do
    assert "rank 3: x" in text
    assert exc.errno == errno.ENOSPC
    clone = pickle.loads(pickle.dumps(exc))  # noqa: S301 - our own object, round trip
    assert clone.bytes_needed == 10
    assert clone.errno == errno.ENOSPC


@pytest.mark.parametrize(
    ("code", "cls"),
    [
        (errno.ENOSPC, ckptguard.StorageFull),
        (errno.EDQUOT, ckptguard.StorageFull),
        (errno.EROFS, ckptguard.ReadOnlyStorage),
        (errno.EACCES, ckptguard.StoragePermissionError),
        (errno.EIO, ckptguard.StorageError),
    ],
)
def test_storage_error_from_os(code: int, cls: type) -> None:
    err = errors.storage_error_from_os(OSError(code, "x", "/p"), "write file")
    assert type(err) is cls
    assert err.errno == code
    assert err.path == "/p"
    assert "write file" in str(err)


def test_transient_flag_gives_transient_error() -> None:
    err = errors.storage_error_from_os(OSError(errno.EBUSY, "busy"), "rename", "/p", transient=True)
    assert type(err) is ckptguard.TransientStorageError
