"""ckptguard: crash-safe, exactly-once, verified checkpoints.

A checkpoint is either committed (complete, checksummed, visible) or invisible. See
``commit.py`` for the protocol and ``errors.py`` for the error tree. The names below are
the public API; this core imports without torch.
"""

from ckptguard._coordination.base import Coordinator, SingleProcess
from ckptguard._errors import (
    CheckpointError,
    CheckpointNotFound,
    CommitConflict,
    CorruptCheckpoint,
    ForeignRun,
    InvalidCheckpointName,
    LockTimeout,
    NoValidCheckpoint,
    ProtectedCheckpoint,
    RankFailure,
    ReadOnlyStorage,
    RootNotADirectory,
    SaveAborted,
    StateFormatError,
    StorageError,
    StorageFull,
    StoragePermissionError,
    StorageUnreachable,
    TargetMismatch,
    TransientStorageError,
    UnsafeManifest,
    UnsupportedFile,
    UnsupportedRoot,
    WriterDied,
)
from ckptguard._format.layout import Naming
from ckptguard._format.manifest import FileEntry, Manifest
from ckptguard._manager.load import load
from ckptguard._manager.manager import CheckpointInfo, CheckpointManager, PendingSave
from ckptguard._manager.preemption import PREEMPTED_EXIT_CODE, Preemption
from ckptguard._manager.retention import RetentionPolicy
from ckptguard._protocol.api import read_manifest, verify
from ckptguard._protocol.recovery import EntryKind, RecoveryReport, RootEntry, recover, scan
from ckptguard._protocol.strategy import CommitResult, Outcome
from ckptguard._protocol.transaction import AtomicCheckpoint, atomic_checkpoint
from ckptguard._protocol.verify import VerifyReport
from ckptguard._state.rng import capture_rng_state, restore_rng_state
from ckptguard._state.serialization import load_legacy_pt
from ckptguard._storage.base import FileDigest, Storage
from ckptguard._storage.local import LocalStorage
from ckptguard._storage.retry import RetryPolicy
from ckptguard._tools.doctor import DoctorReport, doctor

__version__ = "0.1.0"

__all__ = [  # noqa: RUF022 - plain sorted() order, which tests/test_api.py checks
    "AtomicCheckpoint",
    "CheckpointError",
    "CheckpointInfo",
    "CheckpointManager",
    "CheckpointNotFound",
    "CommitConflict",
    "CommitResult",
    "Coordinator",
    "CorruptCheckpoint",
    "DoctorReport",
    "EntryKind",
    "FileDigest",
    "FileEntry",
    "ForeignRun",
    "InvalidCheckpointName",
    "LocalStorage",
    "LockTimeout",
    "Manifest",
    "Naming",
    "NoValidCheckpoint",
    "Outcome",
    "PREEMPTED_EXIT_CODE",
    "PendingSave",
    "Preemption",
    "ProtectedCheckpoint",
    "RankFailure",
    "ReadOnlyStorage",
    "RecoveryReport",
    "RetentionPolicy",
    "RetryPolicy",
    "RootEntry",
    "RootNotADirectory",
    "SaveAborted",
    "SingleProcess",
    "StateFormatError",
    "Storage",
    "StorageError",
    "StorageFull",
    "StoragePermissionError",
    "StorageUnreachable",
    "TargetMismatch",
    "TransientStorageError",
    "UnsafeManifest",
    "UnsupportedFile",
    "UnsupportedRoot",
    "VerifyReport",
    "WriterDied",
    "__version__",
    "atomic_checkpoint",
    "capture_rng_state",
    "doctor",
    "load",
    "load_legacy_pt",
    "read_manifest",
    "recover",
    "restore_rng_state",
    "scan",
    "verify",
]
