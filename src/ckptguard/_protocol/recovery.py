"""Recovery: classify every entry of a root, and repair what a crash can leave.

Classes of entries:
- committed-valid    a directory with a manifest that verifies;
- committed-corrupt  a directory with a manifest (``ckptguard.json``) that does not verify;
- staging-live       a save in progress whose owner is alive (or too recent to judge);
- staging-stale      a save whose owner died, or that has not changed for ``stale_after``;
- trash              a checkpoint moved aside by a replace;
- quarantine         something that stood in a checkpoint's way, kept for a human;
- foreign            anything else: user files, folders without a manifest (such as a
                     half-written ``checkpoint-N`` from a tool without ckptguard).

Repairs (``recover``, under the root's lock):
- a replace cut between its two renames (old checkpoint in trash, final name missing) is
  rolled back: the newest trash copy that verifies is renamed back;
- trash whose checkpoint was replaced by a valid one is removed;
- stale staging is removed.
Nothing else is ever moved or deleted: corrupt and foreign entries are only reported.
"""

from __future__ import annotations

import enum
import logging
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ckptguard._format.layout import (
    MANIFEST_NAME,
    META_DIR,
    QUARANTINE_REASON_SUFFIX,
    parse_staging_name,
)
from ckptguard._protocol.backend import Backend, backend_for
from ckptguard._protocol.cleanup import (
    DEFAULT_STALE_AFTER,
    check_meta_dirs,
    remove_stale_staging,
    repair_trash,
    staging_state,
)
from ckptguard._protocol.locking import DEFAULT_LOCK_TIMEOUT, root_lock
from ckptguard._protocol.marker import clean_store
from ckptguard._protocol.verify import VerifyReport
from ckptguard._protocol.verify import verify_local as verify
from ckptguard._storage.base import Storage, is_url
from ckptguard._storage.local import LocalStorage
from ckptguard._storage.retry import DEFAULT_RETRY, RetryPolicy

if TYPE_CHECKING:
    from collections.abc import Iterable, Mapping

__all__ = ["EntryKind", "RecoveryReport", "RootEntry", "recover", "scan"]

_log = logging.getLogger("ckptguard.recovery")


class EntryKind(enum.StrEnum):
    """The class of an entry of a checkpoint root."""

    COMMITTED_VALID = "committed-valid"
    COMMITTED_CORRUPT = "committed-corrupt"
    STAGING_LIVE = "staging-live"
    STAGING_STALE = "staging-stale"
    TRASH = "trash"
    QUARANTINE = "quarantine"
    FOREIGN = "foreign"


@dataclass(frozen=True)
class RootEntry:
    """One classified entry."""

    kind: EntryKind
    path: str
    name: str
    detail: str = ""
    report: VerifyReport | None = None

    @property
    def step(self) -> int | None:
        return self.report.step if self.report else None


@dataclass(frozen=True)
class RecoveryReport:
    """Every entry of a root, classified, and the repairs made (if any)."""

    root: str
    entries: tuple[RootEntry, ...]
    actions: tuple[str, ...] = ()

    def of_kind(self, kind: EntryKind) -> list[RootEntry]:
        return [e for e in self.entries if e.kind == kind]

    @property
    def valid(self) -> list[RootEntry]:
        """Committed checkpoints that verify, oldest first (by step, then creation time)."""

        def key(e: RootEntry) -> tuple[int, str]:
            manifest = e.report.manifest if e.report else None
            step = manifest.step if manifest and manifest.step is not None else -1
            return (step, manifest.created_at if manifest else "")

        return sorted(self.of_kind(EntryKind.COMMITTED_VALID), key=key)

    @property
    def latest(self) -> RootEntry | None:
        """The newest checkpoint that verifies, or None."""
        valid = self.valid
        return valid[-1] if valid else None


def _classify_top(root: str, names: Iterable[str], *, checksums: bool) -> list[RootEntry]:
    entries = []
    for name in names:
        if name == META_DIR:
            continue
        path = os.path.join(root, name)
        is_real_dir = os.path.isdir(path) and not os.path.islink(path)
        if is_real_dir and os.path.lexists(os.path.join(path, MANIFEST_NAME)):
            report = verify(path, checksums=checksums)
            kind = EntryKind.COMMITTED_VALID if report.ok else EntryKind.COMMITTED_CORRUPT
            detail = "" if report.ok else "; ".join(report.problems)
            entries.append(RootEntry(kind, path, name, detail, report))
        else:
            what = "directory without a manifest" if is_real_dir else "not a directory"
            entries.append(RootEntry(EntryKind.FOREIGN, path, name, what))
    return entries


def scan(
    root: str | os.PathLike[str],
    *,
    checksums: bool = True,
    stale_after: float = DEFAULT_STALE_AFTER,
    storage: Storage | None = None,
    storage_options: Mapping[str, Any] | None = None,
) -> RecoveryReport:
    """Classify every entry of ``root`` (a directory or a URL) without changing anything."""
    if is_url(os.fspath(root)):
        return _scan_store(
            backend_for(root, storage_options, storage=storage, what="scan"),
            checksums=checksums,
            stale_after=stale_after,
        )
    # The resolver refuses an empty root, a file and a path under a file, typed.
    layout = backend_for(root, storage_options, storage=storage, what="scan").layout
    storage = storage or LocalStorage()
    check_meta_dirs(layout)
    entries = _classify_top(layout.root, storage.list_dir(layout.root), checksums=checksums)
    for name in storage.list_dir(layout.staging):
        path = os.path.join(layout.staging, name)
        state = staging_state(storage, path, stale_after=stale_after)
        if state is None:
            entries.append(RootEntry(EntryKind.FOREIGN, path, name, "not a ckptguard staging"))
        else:
            kind = EntryKind.STAGING_LIVE if state.live else EntryKind.STAGING_STALE
            entries.append(RootEntry(kind, path, state.name, state.reason))
    for name in storage.list_dir(layout.trash):
        parsed = parse_staging_name(name)
        path = os.path.join(layout.trash, name)
        entries.append(RootEntry(EntryKind.TRASH, path, parsed[0] if parsed else name))
    quarantine = storage.list_dir(layout.quarantine)
    for name in quarantine:
        if name.endswith(QUARANTINE_REASON_SUFFIX) and name[: -len(".json")] in quarantine:
            continue  # the note that goes with a quarantined entry
        parsed = parse_staging_name(name)
        path = os.path.join(layout.quarantine, name)
        entries.append(RootEntry(EntryKind.QUARANTINE, path, parsed[0] if parsed else name))
    return RecoveryReport(layout.root, tuple(entries))


def recover(
    root: str | os.PathLike[str],
    *,
    checksums: bool = True,
    stale_after: float = DEFAULT_STALE_AFTER,
    lock_timeout: float = DEFAULT_LOCK_TIMEOUT,
    storage: Storage | None = None,
    retry: RetryPolicy = DEFAULT_RETRY,
    storage_options: Mapping[str, Any] | None = None,
) -> RecoveryReport:
    """Repair what a crash left under ``root`` (under its lock), then classify everything.

    On an object store: uploads no manifest refers to, older than ``stale_after``, are
    removed (there is no trash or staging dir to repair).
    """
    if is_url(os.fspath(root)):
        backend = backend_for(root, storage_options, storage=storage, retry=retry,
                              what="recover")  # fmt: skip
        backend.require_root()
        done = backend.repair(stale_after=stale_after, lock_timeout=lock_timeout)
        report = _scan_store(backend, checksums=checksums, stale_after=stale_after)
        return RecoveryReport(report.root, report.entries, tuple(done))
    layout = backend_for(root, storage_options, storage=storage, what="recover").layout
    storage = storage or LocalStorage()
    actions: list[str] = []
    check_meta_dirs(layout)
    if os.path.isdir(layout.meta):
        with root_lock(layout, lock_timeout):
            actions += repair_trash(layout, storage, checksums=checksums, retry=retry)
            for state in remove_stale_staging(storage, layout, stale_after=stale_after):
                actions.append(f"removed stale staging {state.path} ({state.reason})")
    # Classify outside the lock: checksumming a large root must not stall other savers.
    report = scan(layout.root, checksums=checksums, stale_after=stale_after, storage=storage)
    for action in actions:
        _log.info("%s", action)
    return RecoveryReport(report.root, report.entries, tuple(actions))


def _scan_store(backend: Backend, *, checksums: bool, stale_after: float) -> RecoveryReport:
    """Classify an object-store root: checkpoints (by manifest) and uploads none refers to."""
    backend.require_root()
    entries = []
    for name in backend.names():
        path = backend.join(name)
        report = backend.verify(path, checksums=checksums)
        kind = EntryKind.COMMITTED_VALID if report.ok else EntryKind.COMMITTED_CORRUPT
        entries.append(RootEntry(kind, path, name, "; ".join(report.problems), report))
    for orphan in clean_store(backend.storage, backend.root, grace=0.0, dry_run=True):
        fresh = orphan not in clean_store(
            backend.storage, backend.root, grace=stale_after, dry_run=True
        )
        kind = EntryKind.STAGING_LIVE if fresh else EntryKind.STAGING_STALE
        name = orphan.removeprefix(backend.root + "/").split("/", 1)[0]
        entries.append(RootEntry(kind, orphan, name, "an upload no manifest refers to"))
    return RecoveryReport(backend.root, tuple(entries))
