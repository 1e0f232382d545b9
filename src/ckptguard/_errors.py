"""Every error ckptguard raises, in one tree.

::

    CheckpointError(Exception)                       root: catch this to catch everything
    ├── CommitConflict(FileExistsError)              the final name is taken, if_exists="error"
    ├── CorruptCheckpoint(ValueError)                a checkpoint failed verification
    │   └── UnsafeManifest                           a manifest that is malformed or malicious
    ├── UnsupportedFile(ValueError)                  a save holds a symlink, device, fifo or socket
    ├── StateFormatError(TypeError)                  a state value not storable without pickle
    ├── TargetMismatch(ValueError)                   a valid checkpoint not fitting the target
    ├── InvalidCheckpointName(ValueError)            a name that is not a safe single path component
    ├── UnsupportedRoot(ValueError)                  a root or option that cannot be served as given
    │   └── RootNotADirectory(NotADirectoryError)    a local root that is a file or lies under one
    ├── CheckpointNotFound(FileNotFoundError)        no checkpoint at that path
    ├── NoValidCheckpoint(FileNotFoundError)         a root holds no checkpoint that verifies
    ├── LockTimeout(TimeoutError)                    another process held the root's lock too long
    ├── ForeignRun                                   checkpoints (or a live job) of another run
    ├── RankFailure                                  several ranks' step failed on some rank
    │   └── SaveAborted                              a save of several ranks failed on some rank
    └── StorageError(OSError)                        a filesystem operation failed for good
        ├── StorageFull                              ENOSPC, EDQUOT
        ├── ReadOnlyStorage                          EROFS
        ├── StoragePermissionError(PermissionError)  EACCES/EPERM
        └── TransientStorageError                    EBUSY/ESTALE/...: retry deadline passed
            └── StorageUnreachable(ConnectionError)  an endpoint that cannot be reached

Each class also inherits the builtin it resembles, so ``except FileExistsError`` keeps
working in code that predates ckptguard. Every error carries the ``path`` it concerns and
a ``hint`` saying what to do; errors of a distributed save carry ``failures`` (rank ->
message). All of them pickle, so they cross process boundaries intact.
"""

from __future__ import annotations

import errno as _errno
from typing import Any, ClassVar

__all__ = [
    "CheckpointError",
    "CheckpointNotFound",
    "CommitConflict",
    "CorruptCheckpoint",
    "ForeignRun",
    "InvalidCheckpointName",
    "LockTimeout",
    "NoValidCheckpoint",
    "ProtectedCheckpoint",
    "RankFailure",
    "ReadOnlyStorage",
    "RootNotADirectory",
    "SaveAborted",
    "StateFormatError",
    "StorageError",
    "StorageFull",
    "StoragePermissionError",
    "StorageUnreachable",
    "TargetMismatch",
    "TransientStorageError",
    "UnsafeManifest",
    "UnsupportedFile",
    "UnsupportedRoot",
    "WriterDied",
    "storage_error_from_os",
]


def _rebuild(cls: type[CheckpointError], message: str, kwargs: dict[str, Any]) -> CheckpointError:
    return cls(message, **kwargs)


class CheckpointError(Exception):
    """Root of every ckptguard error."""

    default_hint: ClassVar[str] = ""

    def __init__(
        self,
        message: str,
        *,
        path: str | None = None,
        hint: str | None = None,
        failures: dict[int, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.path = path
        self.hint = self.default_hint if hint is None else hint
        self.failures: dict[int, str] = dict(failures or {})

    def _kwargs(self) -> dict[str, Any]:
        return {"path": self.path, "hint": self.hint, "failures": self.failures}

    def __reduce__(self) -> tuple[Any, ...]:
        # OSError and friends pickle their positional args only; rebuild from our fields.
        return (_rebuild, (type(self), self.message, self._kwargs()))

    def __str__(self) -> str:
        parts = [self.message]
        if self.path is not None and self.path not in self.message:
            parts.append(f"(path: {self.path})")
        text = " ".join(parts)
        if self.failures:
            ranks = "; ".join(f"rank {r}: {m}" for r, m in sorted(self.failures.items()))
            text += f" [failures: {ranks}]"
        if self.hint:
            text += f" — {self.hint}"
        return text


class CommitConflict(CheckpointError, FileExistsError):
    """The final name already holds a checkpoint and the save was told not to replace it."""

    default_hint = (
        "pass if_exists='keep' to keep the existing checkpoint or if_exists='replace' "
        "to replace it (the old one is moved to trash first)"
    )


class CorruptCheckpoint(CheckpointError, ValueError):
    """A checkpoint failed verification: missing, extra, truncated or altered files."""

    default_hint = (
        "do not load it; resume from an older checkpoint (ckptguard picks the newest "
        "that verifies) and run `ckptguard verify` for details"
    )

    def __init__(
        self,
        message: str,
        *,
        path: str | None = None,
        hint: str | None = None,
        failures: dict[int, str] | None = None,
        problems: list[str] | None = None,
    ) -> None:
        super().__init__(message, path=path, hint=hint, failures=failures)
        self.problems: list[str] = list(problems or [])

    def _kwargs(self) -> dict[str, Any]:
        return {**super()._kwargs(), "problems": self.problems}


class UnsafeManifest(CorruptCheckpoint):
    """A manifest that is malformed, from an unknown schema, or points outside its checkpoint."""

    default_hint = (
        "the manifest was rejected before anything was read from the checkpoint; "
        "do not load this checkpoint, inspect it by hand or move it away"
    )


class UnsupportedFile(CheckpointError, ValueError):
    """A checkpoint may hold only regular files and directories."""

    default_hint = "write a regular file instead of a symlink, device, fifo or socket"


class InvalidCheckpointName(CheckpointError, ValueError):
    """A checkpoint name must be one safe path component."""

    default_hint = (
        "use a name such as 'checkpoint-100': letters, digits, '.', '_', '=' and '-', "
        "not starting with '.'"
    )


class UnsupportedRoot(CheckpointError, ValueError):
    """A root (or its options) that this entry point cannot act on as given.

    Raised before anything is written, e.g. an object-store URL given to code that can
    only write local files: a URL never becomes a local folder named ``s3:``.
    """

    default_hint = "pass a local directory, or use the entry point the message names"


class RootNotADirectory(UnsupportedRoot, NotADirectoryError):
    """A local root that is a regular file, or a path under one (refused before any write)."""

    default_hint = (
        "a root is a directory (created if missing): choose another path, or move the file away"
    )


class CheckpointNotFound(CheckpointError, FileNotFoundError):
    """No checkpoint exists at the given path."""

    default_hint = "check the path; `ckptguard list ROOT` shows the checkpoints of a root"


class NoValidCheckpoint(CheckpointError, FileNotFoundError):
    """A root holds no checkpoint that verifies."""

    default_hint = (
        "start from scratch, or run `ckptguard list ROOT` to see why each checkpoint was rejected"
    )


class LockTimeout(CheckpointError, TimeoutError):
    """The root's lock was held by another process for longer than the timeout."""

    default_hint = (
        "another process is committing into the same root; wait, raise lock_timeout, "
        "or check for a hung process holding ROOT/.ckptguard/lock"
    )


class ForeignRun(CheckpointError):
    """The checkpoints in question belong to another training run."""

    default_hint = (
        "resume that run (stop the job that runs it first), give this run another root, "
        "or pass new_lineage=True to start a new run beside it"
    )


class ProtectedCheckpoint(CheckpointError):
    """A deletion refused: the checkpoint is the newest valid one, the best, or pinned."""

    default_hint = "pass force=True (CLI: --force) if you really mean to delete it"


class RankFailure(CheckpointError):
    """A step that several ranks take together failed on some rank.

    Start-up, choosing where to resume, a save (:class:`SaveAborted`); ``failures`` names
    each failing rank and its error.
    """

    default_hint = "see each rank's failure; nothing was changed by the ranks that succeeded"


class SaveAborted(RankFailure):
    """A save that several ranks made together failed; ``failures`` names each failing rank."""

    default_hint = (
        "nothing was committed and the staging dir was removed; earlier checkpoints are "
        "intact. Fix the failing rank's error and save again"
    )


class StateFormatError(CheckpointError, TypeError):
    """A value in the state that ckptguard cannot store without pickle."""

    default_hint = "convert the value, or leave it out of the saved state"


class TargetMismatch(CheckpointError, ValueError):
    """The checkpoint is valid but does not fit the target it is restored into."""

    default_hint = (
        "the checkpoint itself verifies; restore without target= to inspect it, or build "
        "the target (model, optimizer) the way it was built when the checkpoint was saved"
    )


class StorageError(CheckpointError, OSError):
    """A filesystem operation failed and retrying will not help."""

    default_hint = (
        "the save was aborted and its staging removed; earlier checkpoints are intact. "
        "Check the filesystem (dmesg, mount options) before retrying"
    )

    def __init__(
        self,
        message: str,
        *,
        path: str | None = None,
        hint: str | None = None,
        failures: dict[int, str] | None = None,
        errno: int | None = None,
    ) -> None:
        super().__init__(message, path=path, hint=hint, failures=failures)
        # OSError.__init__ ran with one argument; set the fields callers inspect.
        self.errno = errno
        self.strerror = _errno.errorcode.get(errno, "") if errno is not None else None
        self.filename = path

    def _kwargs(self) -> dict[str, Any]:
        return {**super()._kwargs(), "errno": self.errno}

    def __str__(self) -> str:
        return CheckpointError.__str__(self)


class StorageFull(StorageError):
    """No space left (ENOSPC) or quota exceeded (EDQUOT)."""

    default_hint = (
        "free space or raise the quota; the save was aborted, its staging removed, "
        "and earlier checkpoints are intact"
    )

    def __init__(
        self,
        message: str,
        *,
        path: str | None = None,
        hint: str | None = None,
        failures: dict[int, str] | None = None,
        errno: int | None = None,
        bytes_needed: int | None = None,
    ) -> None:
        super().__init__(message, path=path, hint=hint, failures=failures, errno=errno)
        self.bytes_needed = bytes_needed

    def _kwargs(self) -> dict[str, Any]:
        return {**super()._kwargs(), "bytes_needed": self.bytes_needed}


class ReadOnlyStorage(StorageError):
    """The filesystem is mounted read-only (EROFS)."""

    default_hint = "save to a writable location, or remount the filesystem read-write"


class StoragePermissionError(StorageError, PermissionError):
    """The process may not write or remove there (EACCES, EPERM)."""

    default_hint = "check the owner and mode of the directory, or save elsewhere"


class TransientStorageError(StorageError):
    """A transient error (EBUSY, ESTALE, EAGAIN, ...) that persisted past the retry deadline."""

    default_hint = (
        "the filesystem kept failing with a normally transient error; check the server "
        "(NFS/Lustre), or raise the retry deadline"
    )


class WriterDied(StorageError):
    """The writer process of ``async_writer="process"`` ended in the middle of a save."""

    default_hint = (
        "the save was aborted and its staging removed; earlier checkpoints are intact. "
        "The next save starts a new writer process (was it killed by the OOM killer?)"
    )


class StorageUnreachable(TransientStorageError, ConnectionError):
    """The storage's endpoint could not be reached within the connect budget."""

    default_hint = (
        "check the endpoint URL (AWS_ENDPOINT_URL or storage_options), the network and "
        "that the server is up; RetryPolicy(connect_budget=...) sets how long to try"
    )


_ERRNO_CLASSES: dict[int, type[StorageError]] = {
    _errno.ENOSPC: StorageFull,
    _errno.EDQUOT: StorageFull,
    _errno.EROFS: ReadOnlyStorage,
    _errno.EACCES: StoragePermissionError,
    _errno.EPERM: StoragePermissionError,
}


def storage_error_from_os(
    exc: OSError, what: str, path: str | None = None, *, transient: bool = False
) -> StorageError:
    """Map an OSError to the typed error for its errno; ``what`` says which step failed."""
    code = exc.errno
    cls: type[StorageError] = _ERRNO_CLASSES.get(code or -1, StorageError)
    if transient:
        cls = TransientStorageError
    name = _errno.errorcode.get(code or -1, "unknown error")
    target = path if path is not None else exc.filename
    message = f"{what} failed with {name}: {exc.strerror or exc}"
    return cls(message, path=None if target is None else str(target), errno=code)
