"""What checkpoints a manager has, across its root and its mirror, and reading them back.

Restore takes the newest checkpoint that verifies, and logs each one it skips and why;
with a mirror, the newer of the root's and the mirror's (the root's on a tie).
"""

from __future__ import annotations

import logging
import posixpath
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ckptguard._errors import (
    CheckpointError,
    CheckpointNotFound,
    CorruptCheckpoint,
    ForeignRun,
    NoValidCheckpoint,
    StorageError,
    storage_error_from_os,
)
from ckptguard._format.manifest import run_of
from ckptguard._manager.options import kind_of

if TYPE_CHECKING:
    from collections.abc import Callable, MutableSequence

    from ckptguard._format.layout import Naming
    from ckptguard._format.manifest import Manifest
    from ckptguard._protocol.backend import Backend
    from ckptguard._protocol.verify import VerifyReport

__all__ = ["Catalog", "CheckpointInfo"]

_log = logging.getLogger("ckptguard.manager")
_RELIST = 3  # listings of a root whose checkpoints vanish while read (see _newest_valid)
_NOTHING = object()  # no checkpoint could be read (None is a state like any other)


@dataclass(frozen=True)
class CheckpointInfo:
    """A checkpoint of a root, as ``list``/``latest``/``save`` report it."""

    step: int
    path: str
    created_at: str | None
    size_bytes: int
    metrics: dict[str, Any]
    valid: bool
    name: str = ""
    files: int = 0
    pinned: bool = False
    checksums_verified: bool = False
    problems: list[str] = field(default_factory=list)
    save_id: str | None = None
    run: str | None = None  # the training run that wrote it (see lineage.py)
    best: bool = False  # the best by ``ranked_by`` (set by listings that rank: mgr.list)
    ranked_by: tuple[str, str] | None = None  # (metric, "min"|"max"), where one is known

    def result(self, timeout: float | None = None) -> CheckpointInfo:
        """This info, at once: ``save(...).result()`` reads the same for blocking and async.

        A blocking save has finished when it returns, so ``timeout`` is never waited on.
        """
        del timeout
        return self

    def done(self) -> bool:
        """True: a blocking save has finished (see ``PendingSave.done``)."""
        return True

    @classmethod
    def from_report(cls, step: int, report: VerifyReport, *, pinned: bool) -> CheckpointInfo:
        m = report.manifest
        return cls(
            step=step,
            path=report.path,
            created_at=m.created_at if m else None,
            size_bytes=m.total_size if m else 0,
            metrics=dict(m.metrics) if m else {},
            valid=report.ok,
            name=posixpath.basename(report.path.rstrip("/")),
            files=len(m.files) if m else 0,
            pinned=pinned,
            checksums_verified=report.checksums and report.ok,
            problems=list(report.problems),
            save_id=m.save_id if m else None,
            run=run_of(m),
        )


class Catalog:
    """The checkpoints of a root (and of its mirror): list, find the newest valid, read."""

    def __init__(
        self,
        backend: Backend,
        naming: Naming,
        *,
        pinned: Callable[[int, Manifest | None], bool],
        mirror: Backend | None = None,
    ) -> None:
        self.backend, self.naming, self.mirror = backend, naming, mirror
        self._pinned = pinned
        # Which checkpoints are this manager's run's (set once its run is chosen).
        self.owns: Callable[[Manifest | None], bool] = lambda _manifest: True

    def committed(self, backend: Backend | None = None) -> list[tuple[int, str]]:
        """(step, path) of every step-named entry, newest first."""
        backend = backend or self.backend
        found = []
        for name in backend.names():
            step = self.naming.step(name)
            if step is not None:
                found.append((step, backend.join(name)))
        return sorted(found, reverse=True)

    def check(
        self, path: str, *, checksums: bool = True, backend: Backend | None = None
    ) -> VerifyReport:
        """Verify a checkpoint of this root; its name must be the one it was committed as."""
        backend = backend or self.backend
        name = path.rstrip("/").rsplit("/", 1)[-1]
        return backend.verify(path, checksums=checksums, expect_name=name)

    def info(self, step: int, report: VerifyReport) -> CheckpointInfo:
        return CheckpointInfo.from_report(step, report, pinned=self._pinned(step, report.manifest))

    def list(self, *, checksums: bool = False) -> list[CheckpointInfo]:
        """Every step checkpoint of the root, oldest first (sizes; checksums if asked)."""
        return [
            self.info(step, self.check(path, checksums=checksums))
            for step, path in reversed(self.committed())
        ]

    def _newest_valid(self, backend: Backend) -> CheckpointInfo | None:
        """The newest that verifies; listed again if some vanished while they were checked.

        Another process's retention may retire what this listing saw (a saver with
        keep_last=1 beside an evaluator): a vanished checkpoint is no reason to answer
        None while a newer one exists.
        """
        for _round in range(_RELIST):
            vanished = False
            for step, path in self.committed(backend):
                report = self.check(path, backend=backend)
                if report.ok and not self.owns(report.manifest):
                    _log.debug("skipping %s: another run's (%s)", path, run_of(report.manifest))
                    continue
                if report.ok:
                    return self.info(step, report)
                if not backend.exists(path):
                    vanished = True
                    _log.info("skipping %s: removed while it was checked", path)
                    continue
                _log.warning("skipping %s: %s", path, "; ".join(report.problems))
            if not vanished:
                break
        return None

    def latest(self) -> CheckpointInfo | None:
        """The newest checkpoint that verifies (checksums included); logs each one skipped."""
        local = self._newest_valid(self.backend)
        if self.mirror is not None:
            try:
                remote = self._newest_valid(self.mirror)
            except (CheckpointError, OSError) as exc:
                _log.warning("mirror unreachable (%s): local checkpoints only", exc)
                remote = None
            if remote is not None and (local is None or remote.step > local.step):
                return remote
        return local

    def restore(self, step: int | None, target: Any, *, any_run: bool = False) -> Any:
        """Load a checkpoint (default: the newest that verifies), into ``target`` if given."""
        if step is not None:
            path = self.backend.join(self.naming.name(step))
            if self.mirror is not None and not self.backend.exists(path):
                mirrored = self.mirror.join(self.naming.name(step))
                return self.read(self.mirror, mirrored, target, any_run=any_run)
            return self.read(self.backend, path, target, any_run=any_run)
        skipped: list[str] = []
        for _round in range(_RELIST):  # again if some vanished (see _newest_valid)
            state, vanished = self._restore_newest(target, skipped)
            if state is not _NOTHING:
                return state
            if not vanished:
                break
        raise NoValidCheckpoint(
            f"no checkpoint in {self.backend.root} verifies"
            + (f" (rejected: {'; '.join(skipped)})" if skipped else ""),
            path=self.backend.root,
        )

    def _restore_newest(self, target: Any, skipped: MutableSequence[str]) -> tuple[Any, bool]:
        """(state of the newest that reads, or _NOTHING; whether some vanished meanwhile)."""
        vanished = False
        candidates = [(s, 1, p, self.backend) for s, p in self.committed()]
        if self.mirror is not None:
            try:
                candidates += [(s, 0, p, self.mirror) for s, p in self.committed(self.mirror)]
            except (CheckpointError, OSError) as exc:
                _log.warning("mirror unreachable (%s): local checkpoints only", exc)
        for _step, _local, path, backend in sorted(candidates, key=lambda c: c[:3], reverse=True):
            try:
                state = self.read(backend, path, target)
            except ForeignRun:
                continue  # another run's: never this run's resume
            except CheckpointNotFound:
                # Retired (another process's retention) between the listing and the read:
                # skipped like a corrupt one, and the next newest is taken.
                _log.info("skipping %s: removed while it was being read", path)
                vanished = True
                continue
            except StorageError as exc:
                if backend is self.backend:
                    raise
                _log.warning("skipping the mirror's %s: %s", path, exc.message)
                continue
            except CorruptCheckpoint as exc:
                _log.warning("skipping %s: %s", path, exc.message)
                skipped.append(f"{posixpath.basename(path)}: {exc.message}")
                continue
            _log.info(
                "restored %s%s",
                path,
                f" (skipped {len(skipped)} newer: invalid)" if skipped else "",
            )
            return state, vanished
        return _NOTHING, vanished

    def read(self, backend: Backend, path: str, target: Any, *, any_run: bool = False) -> Any:
        """Verify the structure, then read every byte checked against the manifest."""
        from ckptguard._state.serialization import read_state  # noqa: PLC0415 - numpy, torch

        report = self.check(path, checksums=False, backend=backend)
        if not report.ok or report.manifest is None:
            if not backend.exists(path):
                raise CheckpointNotFound(f"no checkpoint at {path}", path=path)
            raise CorruptCheckpoint(
                f"{path} does not verify: {'; '.join(report.problems)}",
                path=path,
                problems=report.problems,
            )
        if not any_run and not self.owns(report.manifest):
            raise ForeignRun(
                f"{path} belongs to run {run_of(report.manifest)}, not to this manager's",
                path=path,
                hint="restore(step, any_run=True) reads it anyway",
            )
        kind = kind_of(report.manifest)
        if kind == "files":
            raise CheckpointError(
                f"{path} holds a framework's own files, not a state saved by "
                "CheckpointManager.save",
                path=path,
                hint="load it with the framework that wrote it (its directory is verified)",
            )
        if kind == "dcp":
            from ckptguard._state.sharded import restore_sharded  # noqa: PLC0415 - torch

            return restore_sharded(backend, path, target)
        try:
            manifest, opener, close = backend.open_files(path, report.manifest)
            try:
                return read_state(path, manifest, target=target, opener=opener)  # checksums
            finally:
                close()
        except CheckpointError:
            raise
        except FileNotFoundError as exc:
            if not backend.exists(path):  # deleted under us (another process's retention)
                raise CheckpointNotFound(
                    f"{path} was removed while it was read", path=path
                ) from exc
            raise CorruptCheckpoint(
                f"{path}: a file it lists is missing ({exc.filename})", path=path
            ) from exc
        except OSError as exc:  # EIO and the like: the storage's failure, typed
            raise storage_error_from_os(exc, "reading the checkpoint", path) from exc
