"""ckptguard: crash-safe, exactly-once, verified checkpoints.

A checkpoint is either committed (complete, checksummed, visible) or invisible. See
``commit.py`` for the protocol and ``errors.py`` for the error tree. The names below are
the public API; this core imports without torch.
"""

from ckptguard.commit import AtomicCheckpoint, CommitResult, Outcome, atomic_checkpoint
from ckptguard.coordination import Coordinator, SingleProcess
from ckptguard.doctor import DoctorReport, doctor
from ckptguard.errors import (
    CheckpointError,
    CheckpointNotFound,
    CommitConflict,
    CorruptCheckpoint,
    InvalidCheckpointName,
    LockTimeout,
    NoValidCheckpoint,
    ReadOnlyStorage,
    SaveAborted,
    StateFormatError,
    StorageError,
    StorageFull,
    StoragePermissionError,
    TargetMismatch,
    TransientStorageError,
    UnsafeManifest,
    UnsupportedFile,
)
from ckptguard.manager import CheckpointInfo, CheckpointManager
from ckptguard.manifest import FileEntry, Manifest
from ckptguard.recovery import EntryKind, RecoveryReport, RootEntry, recover, scan
from ckptguard.retention import RetentionPolicy
from ckptguard.retry import RetryPolicy
from ckptguard.rng import capture_rng_state, restore_rng_state
from ckptguard.serialization import load_legacy_pt
from ckptguard.storage import FileDigest, LocalStorage, Storage
from ckptguard.verify import VerifyReport, read_manifest, verify

__version__ = "0.1.0"

__all__ = [
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
    "InvalidCheckpointName",
    "LocalStorage",
    "LockTimeout",
    "Manifest",
    "NoValidCheckpoint",
    "Outcome",
    "ReadOnlyStorage",
    "RecoveryReport",
    "RetentionPolicy",
    "RetryPolicy",
    "RootEntry",
    "SaveAborted",
    "SingleProcess",
    "StateFormatError",
    "Storage",
    "StorageError",
    "StorageFull",
    "StoragePermissionError",
    "TargetMismatch",
    "TransientStorageError",
    "UnsafeManifest",
    "UnsupportedFile",
    "VerifyReport",
    "__version__",
    "atomic_checkpoint",
    "capture_rng_state",
    "doctor",
    "load_legacy_pt",
    "read_manifest",
    "recover",
    "restore_rng_state",
    "scan",
    "verify",
]
