"""Commit strategies: how a sealed save becomes visible, one per kind of storage.

A save goes through the same steps on every backend (``transaction.py`` runs them)::

    stage → write (every rank) → flush (every rank) → seal → commit (incl. publish)
                         └─────────── abort on any failure before the commit ──┘

What differs is the atomic step, so it sits behind :class:`CommitStrategy` (as Orbax
separates its atomic-rename and commit-file temporary paths):

- :class:`~ckptguard._protocol.rename.RenameCommit` (POSIX): files are written into a
  staging dir, then one ``rename(2)`` without replace makes the whole directory visible.
- :class:`~ckptguard._protocol.marker.MarkerCommit` (object stores, which have no
  rename): data objects go under ``<name>/<save id>/`` first, and the manifest, written
  last, is the commit marker.

Each strategy's module starts with the list of what it guarantees. Order of calls for
one save: ``stage`` (the committer; peers ``attach``), ``workdir`` and ``flush`` on every
rank, then ``seal``, ``commit`` (or ``abort``) on the committer.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal, Protocol

from ckptguard._errors import CommitConflict
from ckptguard._format.manifest import run_of
from ckptguard._format.owner import WriterInfo, current_writer
from ckptguard._storage.retry import DEFAULT_RETRY, RetryPolicy

if TYPE_CHECKING:
    from collections.abc import Mapping
    from contextlib import AbstractContextManager

    from ckptguard._format.layout import RootLayout
    from ckptguard._format.manifest import Manifest
    from ckptguard._storage.base import FileDigest, Storage

__all__ = [
    "CommitResult",
    "CommitStrategy",
    "IfExists",
    "Outcome",
    "Staging",
    "cross_run_conflict",
]

IfExists = Literal["keep", "replace", "error"]
IF_EXISTS = ("keep", "replace", "error")


class Outcome(enum.StrEnum):
    """What a commit did."""

    COMMITTED = "committed"  # our save is now the checkpoint
    REPLACED = "replaced"  # ... and an older valid checkpoint of that name was retired
    ALREADY_COMMITTED = "already_committed"  # a peer committed this very save (same save id)
    KEPT_EXISTING = "kept_existing"  # a valid checkpoint of that name exists; ours discarded


@dataclass(frozen=True)
class Staging:
    """A save in progress: where it is written and by whom.

    ``path`` is where the storage writes (a staging dir, or an object-store prefix);
    ``spool`` a local directory for code that writes plain files (object stores only).
    """

    layout: RootLayout
    name: str
    save_id: str
    path: str
    storage: Storage
    retry: RetryPolicy = DEFAULT_RETRY
    writer: WriterInfo = field(default_factory=current_writer)
    spool: str | None = None

    @property
    def final(self) -> str:
        return self.layout.final(self.name)


@dataclass(frozen=True)
class CommitResult:
    """The checkpoint that is visible under the final name after a commit, and how."""

    path: str
    outcome: Outcome
    manifest: Manifest
    replaced: str | None = None  # where the checkpoint we replaced went (POSIX trash)
    quarantined: str | None = None  # where a foreign entry in the way was moved


def cross_run_conflict(final: str, theirs: Manifest, ours: Manifest) -> CommitConflict | None:
    """The error for a save that would replace another training run's checkpoint, if so.

    Two jobs on one root: one run's save never replaces another run's checkpoint (both
    strategies check this before a replace; a checkpoint without a run is anyone's).
    """
    if None in (run_of(theirs), run_of(ours)) or run_of(theirs) == run_of(ours):
        return None
    return CommitConflict(
        f"{final} holds a checkpoint of run {run_of(theirs)}; this save of run "
        f"{run_of(ours)} does not replace it",
        path=final,
        hint="give each run its own root, or its own step numbers",
    )


class CommitStrategy(Protocol):
    """The storage-specific steps of a save, and of finding and retiring checkpoints."""

    kind: str  # "rename" or "manifest-marker"
    # True: every process sees the one copy (an object store); no visibility probe.
    shared: bool

    def prepare_root(self, layout: RootLayout, storage: Storage, *, retry: RetryPolicy) -> None:
        """Create the root and its meta directories where the storage has directories."""

    def stage(
        self,
        layout: RootLayout,
        storage: Storage,
        name: str,
        *,
        retry: RetryPolicy,
        writer: WriterInfo,
    ) -> Staging:
        """Create a fresh staging for checkpoint ``name`` (the committer)."""

    def attach(
        self,
        layout: RootLayout,
        storage: Storage,
        name: str,
        save_id: str,
        *,
        retry: RetryPolicy,
        writer: WriterInfo,
    ) -> Staging:
        """A peer's handle on a staging that its committer created."""

    def workdir(self, staging: Staging) -> str:
        """The local directory this process's code writes the save's files into."""

    def flush(self, staging: Staging) -> dict[str, FileDigest]:
        """Make this process's written files part of the save; their digests."""

    def seal(
        self,
        staging: Staging,
        *,
        known: Mapping[str, FileDigest],
        step: int | None,
        metrics: Mapping[str, Any] | None,
        metadata: Mapping[str, Any] | None,
        others_may_write: bool,
    ) -> Manifest:
        """Make every file durable and prepare the manifest; nothing is visible yet."""

    def commit(
        self,
        staging: Staging,
        manifest: Manifest,
        *,
        if_exists: IfExists,
        dir_mode: int | None,
        supersedes: str | None,
        lock_timeout: float,
        stale_after: float,
    ) -> CommitResult:
        """The atomic step, then publish (durable, cleaned up)."""

    def abort(self, staging: Staging) -> None:
        """Remove everything of a save that was not committed; never raises."""

    def visible_names(self, layout: RootLayout, storage: Storage) -> list[str]:
        """Names under the root that may be checkpoints (to be verified)."""

    def content_prefix(self, manifest: Manifest) -> str:
        """Where, relative to a checkpoint, its files lie ("" or "<save id>/")."""

    def retire(
        self,
        layout: RootLayout,
        storage: Storage,
        name: str,
        *,
        retry: RetryPolicy,
        background: bool = False,
    ) -> bool:
        """Delete a committed checkpoint so that no reader sees half of it; whether gone.

        ``background``: the name is gone on return; what is left of the data may be
        removed by a thread, which ``drain`` waits for.
        """

    def drain(self) -> None:
        """Wait for removals started by ``retire(..., background=True)``."""

    def repair(
        self, layout: RootLayout, storage: Storage, *, stale_after: float, lock_timeout: float
    ) -> list[str]:
        """What a crash left behind, repaired (at start-up); what was done."""

    def lock(self, layout: RootLayout, timeout: float) -> AbstractContextManager[None]:
        """Serialise commits and retention among processes sharing the root."""
