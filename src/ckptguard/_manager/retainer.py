"""Retention: which checkpoints go after a save, pins, and verify-before-delete.

Retention runs only after a new checkpoint is committed and verified, under the root's
lock where there is one, and never deletes the newest valid checkpoint, the best one, a
pinned one, or anything that is not valid. What it keeps in place of what it deletes is
checksum-verified first (once per save id in this process). A retired checkpoint's name
is gone when the save returns; on a local root its files are removed by a background
thread, which the next save, ``wait`` and ``close`` wait for.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
from typing import TYPE_CHECKING

from ckptguard._coordination.base import gather_failures
from ckptguard._errors import CorruptCheckpoint, StorageError, storage_error_from_os
from ckptguard._manager.catalog import Catalog, CheckpointInfo
from ckptguard._manager.retention import (
    Candidate,
    RetentionPolicy,
    metric_value,
    select_deletions,
    standing_in,
)

if TYPE_CHECKING:
    from collections.abc import Callable, Collection

    from ckptguard._coordination.base import Coordinator
    from ckptguard._format.layout import Naming
    from ckptguard._format.manifest import Manifest
    from ckptguard._manager.admin import Admin
    from ckptguard._protocol.backend import Backend
    from ckptguard._protocol.verify import VerifyReport
    from ckptguard._storage.objectstore import StoreListing

__all__ = ["Retainer"]

_log = logging.getLogger("ckptguard.manager")


class Retainer:
    """Applies a :class:`RetentionPolicy` to a root, and keeps its pins."""

    def __init__(
        self,
        backend: Backend,
        policy: RetentionPolicy,
        naming: Naming,
        *,
        lock_timeout: float,
        pins: Admin,
        on_retire: Callable[[str], None] | None = None,
    ) -> None:
        self.backend, self.policy, self.naming = backend, policy, naming
        self.pins = pins
        self.lock_timeout = lock_timeout
        self.on_retire = on_retire  # e.g. the mirror deletes its copy too
        self.verified: dict[str, str] = {}  # path -> save id checksum-verified by us

    # -- pins (kept by admin.py) ------------------------------------------------------------
    def pinned(
        self, step: int, manifest: Manifest | None, listing: StoreListing | None = None
    ) -> bool:
        return self.pins.pinned(step, manifest, listing)

    # -- after a save -------------------------------------------------------------------------
    def after_save(
        self,
        catalog: Catalog,
        step: int,
        path: str,
        *,
        committer: bool,
        pin: bool,
        coord: Coordinator,
        also_keep: Collection[str] = (),
        verify_after_save: bool = False,
        upload: Callable[[str], None] | None = None,
    ) -> CheckpointInfo:
        """Verify the new checkpoint, hand it to ``upload``, then apply retention.

        Each committer does all three. Nothing is deleted on the strength of a save that
        does not verify. With one process, failures raise; with several, they are logged
        on every rank (the commit itself has succeeded by then, on every node). A save
        that raises here returns only once the removals it started have stopped.
        """
        try:
            return self._after_save(
                catalog, step, path, committer=committer, pin=pin, coord=coord,
                also_keep=also_keep, verify_after_save=verify_after_save, upload=upload,
            )  # fmt: skip
        except BaseException:
            with contextlib.suppress(Exception):
                self.drain()
            raise

    def _after_save(
        self,
        catalog: Catalog,
        step: int,
        path: str,
        *,
        committer: bool,
        pin: bool,
        coord: Coordinator,
        also_keep: Collection[str],
        verify_after_save: bool,
        upload: Callable[[str], None] | None,
    ) -> CheckpointInfo:
        error: str | None = None
        report: VerifyReport | None = None
        if committer:
            try:
                report = self._verify_new(catalog, path, checksums=verify_after_save)
                if upload is not None:
                    upload(path)
                self.after_commit(catalog, path, also_keep)
            except Exception as exc:
                if coord.world_size == 1:
                    raise
                error = f"{type(exc).__name__}: {exc}"
        if coord.world_size > 1:
            for rank, err in gather_failures(coord, error).items():
                _log.warning("after committing %s, rank %d failed: %s", path, rank, err)
        if report is None:
            report = catalog.check(path, checksums=False)
        try:
            pinned = pin or self.pins.pin_file(step)
        except OSError as exc:
            if isinstance(exc, StorageError):
                raise
            typed = storage_error_from_os(exc, "looking up the checkpoint's pin", path)
            typed.message += f"; {path} is committed"
            raise typed from exc
        return CheckpointInfo.from_report(step, report, pinned=pinned)

    def _verify_new(self, catalog: Catalog, path: str, *, checksums: bool) -> VerifyReport:
        """Check a checkpoint just committed; raise if it does not verify.

        Sizes and structure always; checksums too with ``verify_after_save``. Either way
        it counts as verified for retention: its checksums were taken from the bytes
        written.
        """
        report = catalog.check(path, checksums=checksums)
        if not report.ok or report.manifest is None:
            # Another process sharing the root may be replacing this name with a newer save,
            # between its two renames (the name is briefly absent): it does so under the
            # root's lock, so look again holding it. A valid newer save is no corruption;
            # its bytes were not written by us, so every checksum is checked before
            # retention relies on it.
            with self.backend.lock(self.lock_timeout):
                report = catalog.check(path, checksums=True)
            if report.ok:
                _log.info("%s was replaced by a newer save of another process", path)
        error = report.extra.get("error")
        if not report.ok and isinstance(error, OSError):
            # Reading back failed (EIO, a store's 5xx...): that is no sign of damage.
            err = (
                error
                if isinstance(error, StorageError)
                else storage_error_from_os(error, "reading back the checkpoint just committed")
            )
            raise type(err)(  # the same class: ReadOnlyStorage, StorageFull, ...
                f"{path} is committed, but reading it back to check it failed: {err.message}",
                path=path,
                errno=err.errno,
                hint="check the storage; retention did not run, and the next save retries it",
            ) from error
        if not report.ok or report.manifest is None:
            raise CorruptCheckpoint(
                f"{path} failed verification right after its commit",
                path=path,
                problems=report.problems,
            )
        self.verified[path] = report.manifest.save_id
        return report

    # -- retention ----------------------------------------------------------------------------
    def fully_verified(self, catalog: Catalog, path: str, save_id: str) -> bool:
        """Checksum-verify a checkpoint once per save id in this process (then cached)."""
        if self.verified.get(path) == save_id:
            return True
        report = catalog.check(path)
        if report.ok:
            self.verified[path] = save_id
        else:
            _log.warning("%s does not verify: %s", path, "; ".join(report.problems))
        return report.ok

    def after_commit(self, catalog: Catalog, path: str, also_keep: Collection[str] = ()) -> None:
        """Retention after the commit of ``path``; a storage failure is raised typed."""
        try:
            self.apply(catalog, path.rstrip("/").rsplit("/", 1)[-1], also_keep)
        except StorageError:
            raise
        except OSError as exc:
            err = storage_error_from_os(exc, "retention after the commit", exc.filename)
            err.message += f"; {path} is committed and intact"
            err.hint = (
                "older checkpoints may not all have been retired; check the filesystem, "
                "the next save retries the retention"
            )
            raise err from exc

    def _kept_unread(self, step: int, counted: int) -> bool:
        """Whether retention keeps ``step`` whatever its manifest says (so it is not read).

        Past the newest ``keep_last`` valid checkpoints, without a best metric, every
        ``keep_every``-th is kept for its own sake: on a root of a thousand such
        checkpoints a save reads none of their manifests.
        """
        policy = self.policy
        return (
            policy.best_metric is None
            and policy.keep_every is not None
            and policy.keep_last is not None
            and counted >= policy.keep_last
            and step % policy.keep_every == 0
        )

    def apply(self, catalog: Catalog, just_saved: str, also_keep: Collection[str] = ()) -> None:
        if self.policy.keep_last is None:
            return  # keeps everything: nothing to list or read
        with self.backend.lock(self.lock_timeout):
            candidates: dict[str, Candidate] = {}
            save_ids: dict[str, str] = {}
            # One listing answers names, sizes and pins on an object store (None locally).
            listing = self.backend.listing()
            counted = 0  # valid checkpoints of this run seen so far, newest first
            for step, path in catalog.committed(listing=listing):
                name = path.rstrip("/").rsplit("/", 1)[-1]
                if self._kept_unread(step, counted):
                    candidates[name] = Candidate(name, step, valid=True, pinned=True)
                    continue
                report = catalog.check(path, checksums=False, listing=listing)
                if report.manifest is not None and not catalog.owns(report.manifest):
                    continue  # another run's: never deleted, never counted
                counted += report.ok
                metric = None
                if report.manifest is not None:
                    save_ids[name] = report.manifest.save_id
                    if self.policy.best_metric is not None:
                        metric = metric_value(report.manifest.metrics.get(self.policy.best_metric))
                keep = self.pinned(step, report.manifest, listing) or name in {
                    just_saved,
                    *also_keep,
                }
                candidates[name] = Candidate(name, step, report.ok, metric, keep)
            newest = max(candidates.values(), key=lambda c: (c.step, c.name), default=None)
            if newest is not None and newest.name != just_saved:
                _log.warning(
                    "%s has a higher step than the checkpoint just saved (%s): resume will "
                    "pick it, not the new one",
                    newest.name, just_saved,
                )  # fmt: skip
            # Sizes are cheap to check but miss bit rot. Before deleting anything, make sure
            # that what the policy keeps in place of the deleted (the newest and the best) is
            # really intact; one that is not is left alone and the choice made again.
            while True:
                deletions = select_deletions(list(candidates.values()), self.policy)
                if not deletions:
                    return
                standing = standing_in(list(candidates.values()), self.policy)
                kept = [c for c in candidates.values() if c.name in standing]
                doubtful = [
                    c
                    for c in kept
                    if not self.fully_verified(catalog, self.backend.join(c.name), save_ids[c.name])
                ]
                if not doubtful:
                    break
                for c in doubtful:
                    candidates[c.name] = dataclasses.replace(c, valid=False)
            for name in deletions:
                if self.on_retire is not None:
                    self.on_retire(name)
                # The name goes now, under the lock; its files are removed by a thread
                # (see rename.py), off the save's path. ``drain`` waits for it.
                self.backend.retire(name, background=True)

    def drain(self) -> None:
        """Wait until the checkpoints retired so far are removed from the disk."""
        self.backend.drain()
