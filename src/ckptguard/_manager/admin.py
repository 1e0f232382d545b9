"""Managing a root's checkpoints by hand: the best one, pins, and deleting one.

Used by :class:`CheckpointManager` (``best``, ``pin``, ``delete``) and by the CLI (``list``,
``pin``, ``unpin``, ``rm``), which has no manager: it opens the root with no lock and no
write until it is asked to change something.

Which checkpoint is "best" is the manager's ``best_metric``/``best_mode``; each save
records them in its manifest, so that a tool without the manager's arguments (the CLI)
finds the same one from the newest checkpoint that names a metric.

``delete`` refuses, unless forced, the three checkpoints retention would never delete:
the newest valid one (resume needs it), the best one and a pinned one. It retires the
checkpoint under the root's lock, as retention does (renamed into trash first, so that a
crash never leaves it half-deleted, and never while a reader holds it).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
from typing import TYPE_CHECKING

from ckptguard._errors import CheckpointNotFound, ProtectedCheckpoint
from ckptguard._format.layout import HF_NAMING, META_DIR, PINS_DIR
from ckptguard._format.manifest import run_of
from ckptguard._manager.catalog import Catalog, CheckpointInfo
from ckptguard._manager.options import best_in, pinned_in
from ckptguard._manager.retention import metric_value
from ckptguard._protocol.locking import DEFAULT_LOCK_TIMEOUT

if TYPE_CHECKING:
    from collections.abc import Callable, Sequence

    from ckptguard._format.layout import Naming
    from ckptguard._format.manifest import Manifest
    from ckptguard._manager.options import BestSpec
    from ckptguard._protocol.backend import Backend
    from ckptguard._storage.objectstore import StoreListing

__all__ = ["Admin", "best_of"]

_log = logging.getLogger("ckptguard.manager")


def best_of(infos: Sequence[CheckpointInfo], spec: BestSpec | None) -> CheckpointInfo | None:
    """The valid checkpoint with the best metric (ties: the newer one); None without one."""
    if spec is None:
        return None
    metric, mode = spec
    sign = 1.0 if mode == "min" else -1.0
    scored = [
        (sign * value, -info.step, info)
        for info in infos
        if info.valid and (value := metric_value(info.metrics.get(metric))) is not None
    ]
    return min(scored, key=lambda s: s[:2])[2] if scored else None


class Admin:
    """The checkpoints of one root, for listing and for changes made by hand.

    Opening one writes nothing and takes no lock (a read-only root lists fine).
    ``best``: the metric and mode to rank by; default, the ones the newest checkpoint
    that names a metric was saved with. ``owns``: which checkpoints count (a manager's
    run); default, every one.
    """

    def __init__(
        self,
        backend: Backend,
        naming: Naming = HF_NAMING,
        *,
        best: BestSpec | None = None,
        lock_timeout: float = DEFAULT_LOCK_TIMEOUT,
        owns_run: Callable[[str | None], bool] | None = None,
        on_retire: Callable[[str], None] | None = None,
    ) -> None:
        self.backend, self.naming, self.lock_timeout = backend, naming, lock_timeout
        self.ranked_by = best  # None: what the newest checkpoint naming one was saved with
        self.on_retire = on_retire
        self.catalog = Catalog(backend, naming, pinned=self.pinned)
        # Which checkpoints count for "newest" and "best" (a manager's run; default all).
        self.owns_run = owns_run or (lambda _run: True)
        self.catalog.owns = lambda manifest: self.owns_run(run_of(manifest))

    # -- pins -------------------------------------------------------------------------------
    def _pin_path(self, step: int) -> str:
        return self.backend.join(f"{META_DIR}/{PINS_DIR}/{self.naming.name(step)}")

    def pin_file(self, step: int, listing: StoreListing | None = None) -> bool:
        """Whether ``step`` has a pin marker (as ``listing`` saw the root, if given)."""
        if listing is not None:
            return listing.exists(self._pin_path(step))
        return self.backend.storage.exists(self._pin_path(step))

    def pinned(
        self, step: int, manifest: Manifest | None, listing: StoreListing | None = None
    ) -> bool:
        return pinned_in(manifest) or self.pin_file(step, listing)

    def pin(self, step: int) -> None:
        """Keep ``step`` whatever retention says (a marker file under ``.ckptguard/pins``)."""
        self._require(step)
        storage = self.backend.storage
        pins = self.backend.join(f"{META_DIR}/{PINS_DIR}")
        storage.make_dir(self.backend.join(META_DIR), mode=0o700, exist_ok=True)
        storage.make_dir(pins, mode=0o700, exist_ok=True)
        path = self._pin_path(step)
        if not storage.exists(path):
            storage.write_bytes(path, b"", fsync=True)
            storage.fsync_dir(pins)

    def unpin(self, step: int) -> None:
        """Undo :meth:`pin` (a checkpoint saved with ``pin=True`` stays pinned)."""
        with contextlib.suppress(FileNotFoundError):
            self.backend.storage.remove_file(self._pin_path(step))

    # -- listing ----------------------------------------------------------------------------
    def _checked(self, *, checksums: bool) -> list[tuple[CheckpointInfo, Manifest | None]]:
        found = []
        for step, path in reversed(self.catalog.committed()):
            report = self.catalog.check(path, checksums=checksums)
            found.append((self.catalog.info(step, report), report.manifest))
        return found

    def list(self, *, checksums: bool = False) -> list[CheckpointInfo]:
        """Every step checkpoint of the root, oldest first, ``best`` set on the best one."""
        found = self._checked(checksums=checksums)
        spec = self.ranked_by or next(
            (s for _, m in reversed(found) if (s := best_in(m)) is not None), None
        )
        best = best_of([i for i, m in found if self.catalog.owns(m)], spec)
        return [
            dataclasses.replace(i, best=best is not None and i.path == best.path, ranked_by=spec)
            for i, _ in found
        ]

    def best(self) -> CheckpointInfo | None:
        """The valid checkpoint with the best metric (structure checked; None: no metric)."""
        return next((i for i in self.list() if i.best), None)

    # -- deleting ---------------------------------------------------------------------------
    def _require(self, step: int) -> str:
        path = self.backend.join(self.naming.name(step))
        if not self.backend.exists(path):
            raise CheckpointNotFound(
                f"no checkpoint for step {step} in {self.backend.root}",
                path=path,
                hint="`ckptguard list ROOT` shows the steps there are",
            )
        return path

    def refusal(self, step: int, infos: Sequence[CheckpointInfo]) -> str | None:
        """Why deleting ``step`` needs force (None: it does not)."""
        info = next((i for i in infos if i.step == step), None)
        if info is None:
            return None
        valid = [i for i in infos if i.valid and self.owns_run(i.run)]
        newest = max(valid, key=lambda i: (i.step, i.name), default=None)
        if newest is not None and newest.path == info.path:
            return "it is the newest valid checkpoint (resume needs it)"
        if info.best and info.ranked_by is not None:
            return f"it is the best checkpoint by {info.ranked_by[0]} ({info.ranked_by[1]})"
        if info.pinned:
            return "it is pinned (unpin it first)"
        return None

    def delete(self, step: int, *, force: bool = False) -> str:
        """Delete ``checkpoint-<step>`` (see the module docstring); returns its path."""
        path = self._require(step)
        name = self.naming.name(step)
        with self.backend.lock(self.lock_timeout):
            reason = self.refusal(step, self.list())
            if reason is not None and not force:
                raise ProtectedCheckpoint(
                    f"not deleting {path}: {reason}",
                    path=path,
                    hint="pass force=True (CLI: --force) if you really mean to delete it",
                )
            if reason is not None:
                _log.warning("deleting %s although %s (forced)", path, reason)
            if self.on_retire is not None:
                self.on_retire(name)
            self.backend.retire(name)
            self.unpin(step)
        _log.info("deleted %s", path)
        return path
