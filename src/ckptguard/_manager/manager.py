"""CheckpointManager: save, restore, list, verify and retain training checkpoints.

::

    mgr = CheckpointManager("runs/exp1", keep_last=3, best_metric="eval_loss")
    mgr.save(step, {"model": model, "optimizer": opt, "rng": capture_rng_state()},
             metrics={"eval_loss": 0.41})
    state = mgr.restore(target={"model": model, "optimizer": opt})   # newest that verifies

The front door, composed of parts that each answer one question: the backend (where the
root is and how a save commits there: ``_protocol/backend.py``), the async saver
(``saver.py``), the catalog (what exists, across the root and its mirror:
``catalog.py``) and the retainer (what goes after a save: ``retainer.py``). Each save
goes through the commit transaction (``_protocol/transaction.py``); retention runs only
after the new checkpoint is committed and verified.
"""

from __future__ import annotations

import logging
import os
import time
import weakref
from typing import TYPE_CHECKING, Any, Literal, NoReturn, overload

from ckptguard._coordination.base import Coordinator, default_coordinator
from ckptguard._errors import (
    CheckpointNotFound,
    NoValidCheckpoint,
    ReadOnlyStorage,
    UnsupportedRoot,
)
from ckptguard._format.layout import HF_NAMING, Naming
from ckptguard._manager.admin import Admin
from ckptguard._manager.catalog import Catalog, CheckpointInfo
from ckptguard._manager.options import (
    SaveOptions,
    clean_metrics,
    commit_state,
    flagged,
    result_of,
    with_incremental,
)
from ckptguard._manager.preemption import Handling, exit_preempted, policy_of
from ckptguard._manager.retainer import Retainer
from ckptguard._manager.retention import RetentionPolicy
from ckptguard._manager.saver import (
    AsyncSaver,
    PendingSave,
    begin_transaction,
    finish_transaction,
    forget,
    watch_exit,
)
from ckptguard._manager.startup import start
from ckptguard._protocol.backend import backend_for
from ckptguard._protocol.cleanup import DEFAULT_STALE_AFTER
from ckptguard._protocol.locking import DEFAULT_LOCK_TIMEOUT
from ckptguard._storage.retry import DEFAULT_RETRY, RetryPolicy

if TYPE_CHECKING:
    from collections.abc import Callable, Collection, Mapping, Sequence
    from pathlib import Path

    from ckptguard._manager.mirror import Mirror
    from ckptguard._manager.preemption import Preemption
    from ckptguard._protocol.strategy import IfExists
    from ckptguard._protocol.transaction import AtomicCheckpoint
    from ckptguard._protocol.verify import VerifyReport
    from ckptguard._state.procwriter import WriterProcess
    from ckptguard._state.reuse import Incremental, Reuse
    from ckptguard._state.serialization import EncodedState
    from ckptguard._storage.base import Storage

__all__ = ["CheckpointInfo", "CheckpointManager", "PendingSave"]

_log = logging.getLogger("ckptguard.manager")


class CheckpointManager:
    """Checkpoints of one training run under ``root`` (see the module docstring)."""

    def __init__(  # noqa: PLR0917 - DESIGN.md's public signature takes these positionally
        self,
        root: str | os.PathLike[str],
        keep_last: int | None = 3,
        keep_best: int = 1,
        best_metric: str | None = None,
        best_mode: Literal["min", "max"] = "min",
        keep_every: int | None = None,
        async_save: bool = False,  # noqa: FBT001, FBT002 - the DESIGN.md signature, positional
        storage_options: Mapping[str, Any] | None = None,
        *,
        if_exists: IfExists = "replace",
        retry: RetryPolicy = DEFAULT_RETRY,
        lock_timeout: float = DEFAULT_LOCK_TIMEOUT,
        stale_after: float = DEFAULT_STALE_AFTER,
        storage: Storage | None = None,
        coordinator: Coordinator | None = None,
        naming: Naming = HF_NAMING,
        exit_timeout: float = 120.0,
        verify_after_save: bool = False,
        mirror: str | None = None,
        check_environment: bool = True,
        run_id: str | None = None,
        new_lineage: bool = False,
        read_only: bool | None = None,
        max_concurrency: int | None = None,
        preemption: bool | str | int | Sequence[str | int] | Preemption = False,
        async_writer: Literal["thread", "process"] = "thread",
        incremental: bool | None = None,
        full_every: int = 10,
    ) -> None:
        """Checkpoints of one run under ``root``: a directory, or a URL (s3://bucket/run).

        ``async_save=True``: ``save`` returns once the state is copied into staging buffers
        and writes, commits and retains in a background thread (``blocking=`` overrides it
        per save). ``exit_timeout``: how long process exit (atexit, SIGTERM) waits for an
        in-flight async save before giving up on it. ``async_writer="process"`` (a local
        root, Linux): the tensor files of async saves are written by a separate process
        started at the first one, from memory shared with it, so a Python-heavy training
        loop does not share the GIL with the writer (see ``_state/procwriter.py``);
        the default ``"thread"`` writes them on the background thread.

        ``verify_after_save=True`` reads every new checkpoint back and checks its checksums
        before retention may delete anything. Off by default: the checksums are computed
        over the very bytes handed to ``write(2)`` (or read back from the files a
        framework wrote) and the files are fsynced before the commit, so a read-back
        served from the page cache finds nothing new; it costs a full read of the save.
        Sizes and structure are always checked, and every restore checks the checksums.

        ``mirror="s3://bucket/run"`` (a local root only): each committed checkpoint is also
        uploaded in the background and its remote copy verified (see ``mirror.py``;
        ``storage_options`` are the mirror's); ``latest``/``restore`` take the newest valid
        checkpoint of local and mirror.

        ``max_concurrency`` (default 16): an object store's requests in flight at once
        (multipart parts, ranged reads, the mirror's files), which also bounds the memory
        of transfers (that many part-size buffers, 8 MiB each, plus two).

        ``preemption=True`` (SIGTERM), a signal name or number (``"SIGUSR1"`` for SLURM's
        ``--signal=USR1@90``), several, or a :class:`Preemption` policy: the signal only
        records a request, which :meth:`preemption_requested` turns into one step every
        rank agrees on (see ``preemption.py``). Off by default: the program's signals are
        its own, and SIGTERM finishes an in-flight async save and ends the process.

        ``incremental`` (default: on; False turns it off): a file of a save that a
        committed checkpoint of the root holds already (a frozen backbone, a reference
        model) is linked to it (a reflink, or a hard link; on an object store a
        server-side copy of the newest checkpoint's object) instead of written again;
        every checkpoint still lists and verifies every byte, and deleting one never
        damages another (see ``_state/reuse.py`` and docs/incremental.md).
        ``full_every`` (10): every N-th save is written in full, so that one damaged
        shared file reaches at most N checkpoints.

        ``storage``: the storage to use instead of the one the root's kind implies (a
        fault-injecting wrapper in tests); for a URL root it wraps an ``FsspecStorage``.

        ``check_environment``: run the fast part of :func:`ckptguard.doctor` at start
        (library versions, the root's contents) and log what it finds as warnings; also
        off with the environment variable ``CKPTGUARD_DOCTOR=0``.

        Runs (see ``lineage.py``): the manager continues the run of the newest checkpoint
        (or ``run_id``/``CKPTGUARD_RUN_ID``), keeps and restores only that run's
        checkpoints, and refuses with :class:`ForeignRun` a root whose newest run is live
        in another job, unless ``new_lineage=True`` starts a new run beside it.

        ``read_only`` (default: a local root this process cannot write, such as a
        read-only mount, is opened read-only): list, verify and restore with no lock, no
        start-up recovery and no write at all, and never refused for a run that is live
        elsewhere (an evaluation job beside the training); ``save``, ``pin`` and
        ``delete`` raise :class:`ReadOnlyStorage`.
        """
        self.backend = backend_for(
            root,
            None if mirror is not None else storage_options,
            storage=storage,
            retry=retry,
            what="CheckpointManager",
            max_concurrency=max_concurrency,
        )
        self.mirror: Mirror | None = None
        mirror_backend = None
        if mirror is not None:
            if self.backend.remote:
                raise UnsupportedRoot(
                    f"mirror={mirror!r} is for local roots: {self.backend.root} is on an "
                    "object store already",
                    path=self.backend.root,
                    hint="drop mirror=, or save to a local root and mirror it",
                )
            from ckptguard._manager.mirror import Mirror  # noqa: PLC0415 - fsspec

            self.mirror = Mirror(mirror, storage_options, max_concurrency=max_concurrency)
            mirror_backend = self.mirror.backend
            watch_exit(self)  # exit waits for queued uploads too
        reason = self.backend.read_only_reason() if read_only is None else None
        self.read_only = bool(read_only) or reason is not None
        self._read_only_why = reason or "it was opened with read_only=True"
        self.async_save = bool(async_save)
        self.verify_after_save = verify_after_save
        self.exit_timeout = exit_timeout
        self.root = self.backend.root
        self.layout = self.backend.layout
        self.storage = self.backend.storage
        self.policy = RetentionPolicy(keep_last, keep_best, best_metric, best_mode, keep_every)
        self.if_exists: IfExists = if_exists
        self.retry, self.lock_timeout, self.stale_after = retry, lock_timeout, stale_after
        self.naming = naming
        self.options = SaveOptions(
            self.backend, naming, if_exists, retry, lock_timeout, stale_after
        )
        best = (best_metric, best_mode) if best_metric is not None else None
        self.admin = Admin(
            self.backend, naming, best=best, lock_timeout=lock_timeout,
            on_retire=self._retire_mirror_copy,
        )  # fmt: skip
        self.retainer = Retainer(
            self.backend, self.policy, naming, lock_timeout=lock_timeout, pins=self.admin,
            on_retire=self._retire_mirror_copy,
        )  # fmt: skip
        self.catalog = Catalog(
            self.backend, naming, pinned=self.admin.pinned, mirror=mirror_backend
        )
        self.coordinator = coordinator or default_coordinator()
        self.saver = AsyncSaver(
            self, self.coordinator, self._commit_state, self._writer_process(async_writer)
        )
        self.incremental = self._incremental(wanted=incremental, full_every=full_every)
        self.saver.split_frozen = self.incremental is not None
        self.saver.prelink = self._prelink if self.incremental is not None else None
        # A framework save's plan of what to link, by its transaction (see reuse_for).
        self._plans: weakref.WeakKeyDictionary[AtomicCheckpoint, Callable[[], Reuse | None]]
        self._plans = weakref.WeakKeyDictionary()
        policy = policy_of(preemption)  # a wrong value raises before start-up
        self.lineage, self._hold = start(
            self.backend,
            self.catalog,
            self.coordinator,
            read_only=self._read_only_why if self.read_only else None,
            check_environment=check_environment,
            run_id=run_id,
            new_lineage=new_lineage,
            stale_after=stale_after,
            lock_timeout=lock_timeout,
        )
        self.catalog.owns = self.lineage.owns
        self.admin.owns_run = self.lineage.owns_run
        self.preemption = None if policy is None else self._handle_preemption(policy)

    def _writer_process(self, kind: str) -> WriterProcess | None:
        """The writer process ``async_writer`` asks for (not started yet), or None."""
        if kind == "thread":
            return None
        if kind != "process":
            raise ValueError(f"async_writer must be 'thread' or 'process', got {kind!r}")
        from ckptguard._state.procwriter import (  # noqa: PLC0415 - only this option needs it
            WriterProcess,
            process_writer_unsupported,
        )
        from ckptguard._storage.base import innermost  # noqa: PLC0415
        from ckptguard._storage.local import LocalStorage  # noqa: PLC0415

        why = process_writer_unsupported()
        local = innermost(self.storage)
        if why is None and self.backend.remote:
            why = "it writes to local storage only (the root is on an object store)"
        elif why is None and type(local) is not LocalStorage:
            why = f"it writes with a plain LocalStorage, and storage= is a {type(local).__name__}"
        if why is not None:
            raise UnsupportedRoot(
                f"async_writer='process' is not available for {self.root}: {why}",
                path=self.root,
                hint="use the default async_writer='thread'",
            )
        return WriterProcess(local)

    def _incremental(self, *, wanted: bool | None, full_every: int) -> Incremental | None:
        """Incremental saves' state (None: every save writes every byte)."""
        from ckptguard._state.reuse import Incremental  # noqa: PLC0415

        if wanted is not None and not isinstance(wanted, bool):
            raise TypeError(f"incremental must be True, False or None, got {wanted!r}")
        policy = Incremental(full_every)  # a bad full_every raises either way
        return policy if wanted is not False else None

    def _prelink(self, encoded: EncodedState) -> EncodedState:
        """Async saves: frozen files a committed checkpoint holds stay out of the snapshot."""
        from ckptguard._state.reuse import FROZEN_SUFFIX  # noqa: PLC0415
        from ckptguard._state.serialization import prelink_frozen  # noqa: PLC0415 - torch

        inc = self.incremental
        if inc is None or not any(g.file.endswith(FROZEN_SUFFIX) for g in encoded.groups):
            return encoded
        try:
            reuse, _chain = inc.plan(self.options.committed(), self.options.manifest_reader())
        except Exception as exc:  # the background save plans (and reports) again
            _log.debug("no prelink for this save: %s", exc)
            return encoded
        return prelink_frozen(encoded, reuse)

    @property
    def in_flight(self) -> PendingSave | None:
        """The async save in flight, if any (exit waits for it)."""
        return self.saver.pending

    # -- saving ----------------------------------------------------------------------------
    @overload
    def save(
        self,
        step: int,
        state: Any,
        metrics: Mapping[str, Any] | None = ...,
        metadata: Mapping[str, Any] | None = ...,
        *,
        pin: bool = ...,
        blocking: Literal[True],
        sharded: bool = ...,
    ) -> CheckpointInfo: ...
    @overload
    def save(
        self,
        step: int,
        state: Any,
        metrics: Mapping[str, Any] | None = ...,
        metadata: Mapping[str, Any] | None = ...,
        *,
        pin: bool = ...,
        blocking: Literal[False],
        sharded: bool = ...,
    ) -> PendingSave: ...
    @overload
    def save(
        self,
        step: int,
        state: Any,
        metrics: Mapping[str, Any] | None = ...,
        metadata: Mapping[str, Any] | None = ...,
        *,
        pin: bool = ...,
        blocking: bool | None = ...,
        sharded: bool = ...,
    ) -> CheckpointInfo | PendingSave: ...
    def save(
        self,
        step: int,
        state: Any,
        metrics: Mapping[str, Any] | None = None,
        metadata: Mapping[str, Any] | None = None,
        *,
        pin: bool = False,
        blocking: bool | None = None,
        sharded: bool = False,
    ) -> CheckpointInfo | PendingSave:
        """Save ``state`` as ``checkpoint-<step>``: atomic, checksummed, then retention.

        ``blocking`` (default: ``not async_save``): ``False`` returns a :class:`PendingSave`
        as soon as the state's tensors are copied into reused staging buffers; writing,
        checksums, fsync, commit and retention run in a background thread. At most one
        save is in flight: a save waits for the previous one, and raises its error if it
        failed (as do :meth:`wait` and :meth:`close`).

        ``sharded=True``: every rank writes its own shards through
        torch.distributed.checkpoint straight into the save's staging dir or, on an object
        store, its fresh prefix; one manifest lists every rank's files and commits them
        once (see ``sharded.py``); always blocking.

        Under torch.distributed every rank calls this; each committer (rank 0 on a shared
        root, one rank per node on node-local roots) writes its state (the replicated state
        of data-parallel training) and commits, and every rank gets the same result, or the
        same :class:`SaveAborted`.
        """
        if isinstance(step, bool) or not isinstance(step, int) or step < 0:
            raise ValueError(f"step must be a non-negative int, got {step!r}")
        self._writable("save")
        if blocking is None:
            blocking = not self.async_save or sharded
        elif not blocking and sharded:
            raise ValueError(
                "sharded=True saves are blocking (torch.distributed.checkpoint writes them); "
                "pass blocking=True, or leave blocking unset"
            )
        self.saver.wait()  # at most one save in flight; raises the previous one's error
        if sharded:
            return self._save_sharded(step, state, metrics, metadata, pin=pin)
        if not blocking:
            path = self.backend.join(self.naming.name(step))
            flags = self._flags(metadata, "state", pin=pin)
            return self.saver.start(step, path, state, clean_metrics(metrics), flags, pin=pin)
        flags = self._flags(metadata, "state", pin=pin)
        return self._commit_state(
            step, None, state, metrics, flags, pin=pin, coord=self.coordinator
        )

    def _commit_state(
        self,
        step: int,
        encoded: EncodedState | None,
        state: Any,
        metrics: Mapping[str, Any] | None,
        metadata: dict[str, Any],
        *,
        pin: bool,
        coord: Coordinator,
    ) -> CheckpointInfo:
        """Every rank calls: commit the state (see ``options.commit_state``), then retain."""

        def took_part(committer: bool) -> None:  # noqa: FBT001 - a callback's one flag
            self.saver.committer = committer

        path, committer = commit_state(
            self.options, step, encoded, state, metrics, metadata,
            coord=coord, took_part=took_part, incremental=self.incremental,
        )  # fmt: skip
        return self._after_commit(step, path, committer=committer, pin=pin, coord=coord)

    def _save_sharded(
        self,
        step: int,
        state: Any,
        metrics: Mapping[str, Any] | None,
        metadata: Mapping[str, Any] | None,
        *,
        pin: bool,
    ) -> CheckpointInfo:
        from ckptguard._state.sharded import KIND, write_shards  # noqa: PLC0415 - imports torch

        coord = self.coordinator
        flags = self._flags(metadata, KIND, pin=pin)
        tx = self.options.transaction(step, metrics, flags, coord)
        with tx:
            write_shards(tx, state)
        path = result_of(tx).path
        return self._after_commit(step, path, committer=coord.rank == 0, pin=pin, coord=coord)

    def _flags(self, metadata: Mapping[str, Any] | None, kind: str, *, pin: bool) -> dict[str, Any]:
        best = self.admin.ranked_by
        return flagged(metadata, kind=kind, pin=pin, run=self.lineage.run, best=best)

    def _writable(self, what: str) -> None:
        if self.read_only:
            raise ReadOnlyStorage(
                f"cannot {what}: {self.root} is open read-only: {self._read_only_why}",
                path=self.root,
                hint="list, verify and restore work; to save, open a writable root (or "
                "remount it read-write)",
            )

    # -- after a commit ----------------------------------------------------------------------
    def _after_commit(
        self,
        step: int,
        path: str,
        *,
        committer: bool,
        pin: bool,
        coord: Coordinator,
        also_keep: Collection[str] = (),
    ) -> CheckpointInfo:
        """Verify the new checkpoint, mirror it, then apply retention (see retainer.py)."""
        upload = self.mirror.upload if self.mirror is not None and coord.rank == 0 else None
        return self.retainer.after_save(
            self.catalog,
            step,
            path,
            committer=committer,
            pin=pin,
            coord=coord,
            also_keep=also_keep,
            verify_after_save=self.verify_after_save,
            upload=upload,
        )

    def _retire_mirror_copy(self, name: str) -> None:
        if self.mirror is not None and self.coordinator.rank == 0:
            self.mirror.retire(name)

    # -- reading ---------------------------------------------------------------------------
    def list(self, *, checksums: bool = False) -> list[CheckpointInfo]:
        """Every ``checkpoint-<step>`` of the root, oldest first (``best`` marks the best).

        Sizes and structure are checked; checksums too with ``checksums=True``.
        """
        return self.admin.list(checksums=checksums)

    def latest(self) -> CheckpointInfo | None:
        """The newest checkpoint that verifies (checksums included); logs each one skipped.

        With a mirror: the newer of the local and the mirror's (local on a tie).
        """
        return self.catalog.latest()

    def verify(self, step: int | None = None) -> VerifyReport:
        """Verify one checkpoint (default: the newest, valid or not)."""
        if step is None:
            committed = self.catalog.committed()
            if not committed:
                raise NoValidCheckpoint(f"no checkpoints in {self.root}", path=self.root)
            return self.catalog.check(committed[0][1])
        path = self.backend.join(self.naming.name(step))
        if not self.backend.exists(path):
            raise CheckpointNotFound(f"no checkpoint for step {step}", path=path)
        return self.catalog.check(path)

    def restore(self, step: int | None = None, target: Any = None, *, any_run: bool = False) -> Any:
        """Load a checkpoint (default: the newest that verifies), into ``target`` if given.

        Every byte is checked against the manifest before anything is loaded into the
        target. With ``step=None`` a corrupt checkpoint is skipped (and logged) in favour of
        the next older one; an explicit ``step`` that does not verify raises. Only this
        run's checkpoints: an explicit ``step`` of another run raises :class:`ForeignRun`
        unless ``any_run=True``.
        """
        return self.catalog.restore(step, target, any_run=any_run)

    # -- retention -------------------------------------------------------------------------
    def pin(self, step: int) -> None:
        """Keep ``checkpoint-<step>`` whatever the retention policy says."""
        self._writable("pin a checkpoint")
        self.admin.pin(step)

    def unpin(self, step: int) -> None:
        """Undo :meth:`pin` (a checkpoint saved with ``pin=True`` stays pinned)."""
        self._writable("unpin a checkpoint")
        self.admin.unpin(step)

    def best(self) -> CheckpointInfo | None:
        """This run's valid checkpoint with the best ``best_metric`` (None without one).

        Ties go to the newer checkpoint; sizes and structure are checked, not checksums.
        """
        return self.admin.best()

    def delete(self, step: int, *, force: bool = False) -> str:
        """Delete ``checkpoint-<step>`` now (and its mirror copy); returns its path.

        Refuses with :class:`ProtectedCheckpoint`, unless ``force=True``, the newest valid
        checkpoint (resume needs it), the best one and a pinned one. Like retention, it
        moves the checkpoint into trash under the root's lock before removing it, and
        never while a reader is reading it.
        """
        self._writable("delete a checkpoint")
        self.wait()
        return self.admin.delete(step, force=force)

    # -- preemption ------------------------------------------------------------------------
    def _handle_preemption(self, policy: Preemption) -> Handling:
        try:
            return Handling(policy, self.coordinator, strict=True)
        except BaseException:  # refused: another handler, or not the main thread
            if self._hold is not None:
                self._hold.release()
            raise

    def preemption_requested(self, step: int) -> bool:
        """Every rank, at every step boundary: whether to save ``step`` now and exit.

        True on every rank at the same step once any rank received a preemption signal
        (see ``preemption=``); then ``save`` and :meth:`exit_preempted`.
        """
        if self.preemption is None:
            raise ValueError(
                "preemption_requested() needs CheckpointManager(..., preemption=True) "
                "(or the signal to handle)"
            )
        return self.preemption.poll(step)

    def exit_preempted(self) -> NoReturn:
        """After the preemption save: wait for it, log one line, exit with the code.

        Raises ``SystemExit(ckptguard.PREEMPTED_EXIT_CODE)`` (75, EX_TEMPFAIL); the line
        names the signal, the step and the committed checkpoint.
        """
        self.wait()
        step = None if self.preemption is None else self.preemption.step
        path = None if step is None else self.backend.join(self.naming.name(step))
        exit_preempted(step, path if path is not None and self.backend.exists(path) else None)

    # -- waiting and closing ------------------------------------------------------------
    def wait(self, timeout: float | None = None) -> CheckpointInfo | None:
        """Finish the in-flight async save: its CheckpointInfo, or its error raised.

        Also waits until the checkpoints that retention retired are off the disk (their
        names went during the save). None when no save is in flight (or its result was
        already taken). A failed save is raised once, by whichever of ``wait``, ``save``,
        ``close`` or ``PendingSave.result`` comes first. With a mirror, also waits for every queued
        upload and raises the first mirroring failure since the last ``wait``.
        """
        info = self.saver.wait(timeout)
        self.retainer.drain()  # retired checkpoints off the disk
        if self.mirror is not None:
            self.mirror.wait()
        return info

    def close(self) -> None:
        """Finish the in-flight save (raising its error), then free the staging buffers."""
        try:
            self.wait()
        finally:
            self.retainer.drain()
            if self.mirror is not None:
                self.mirror.close()
            self.saver.release()
            if self._hold is not None:
                self._hold.release()
            if self.preemption is not None:
                self.preemption.close()
            forget(self)

    def __enter__(self) -> CheckpointManager:
        return self

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        if exc_type is None:
            self.close()
            return
        try:  # an error is already on its way: log a failed save instead of masking it
            self.close()
        except Exception:
            _log.exception("while closing after an error, the last async save failed")

    @overload
    def save_files(
        self,
        step: int,
        write: Callable[[AtomicCheckpoint], Any],
        metrics: Mapping[str, Any] | None = ...,
        metadata: Mapping[str, Any] | None = ...,
        *,
        prepare: Callable[[Path], None] | None = ...,
        also_keep: Collection[str] = ...,
        supersedes: str | None = ...,
        blocking: Literal[True] = ...,
    ) -> CheckpointInfo: ...
    @overload
    def save_files(
        self,
        step: int,
        write: Callable[[AtomicCheckpoint], Any],
        metrics: Mapping[str, Any] | None = ...,
        metadata: Mapping[str, Any] | None = ...,
        *,
        prepare: Callable[[Path], None] | None = ...,
        also_keep: Collection[str] = ...,
        supersedes: str | None = ...,
        blocking: Literal[False],
    ) -> PendingSave: ...
    @overload
    def save_files(
        self,
        step: int,
        write: Callable[[AtomicCheckpoint], Any],
        metrics: Mapping[str, Any] | None = ...,
        metadata: Mapping[str, Any] | None = ...,
        *,
        prepare: Callable[[Path], None] | None = ...,
        also_keep: Collection[str] = ...,
        supersedes: str | None = ...,
        blocking: bool = ...,
    ) -> CheckpointInfo | PendingSave: ...
    def save_files(
        self,
        step: int,
        write: Callable[[AtomicCheckpoint], Any],
        metrics: Mapping[str, Any] | None = None,
        metadata: Mapping[str, Any] | None = None,
        *,
        prepare: Callable[[Path], None] | None = None,
        also_keep: Collection[str] = (),
        supersedes: str | None = None,
        blocking: bool = True,
    ) -> CheckpointInfo | PendingSave:
        """Commit the files that ``write(staging_dir)`` writes, as the checkpoint of ``step``.

        For frameworks that write their own files (Hugging Face, Accelerate, Lightning).
        Under torch.distributed every rank calls this and ``write(tx)`` runs on every rank,
        which may write its own files into ``tx.staging_dir``; ``prepare(staging_dir)``
        runs on each committer after every rank's writes succeeded, before the seal. An
        exception in ``write`` raises at once on its rank (the others may be inside the
        framework's own collectives; the launcher ends the job). Then
        the new checkpoint is verified and retention runs; ``also_keep`` names checkpoints
        it must keep this time (a framework's "best" checkpoint). ``supersedes``: the
        save id of a checkpoint of this name to replace even if it no longer verifies
        (changed after its commit).

        ``blocking=False`` (async framework saves, see ``integrations/_capture.py``):
        ``write(tx)`` still runs here, and may return a callable that finishes the files
        (the deferred writes); that callable, then the seal, the commit and retention run
        in a background thread, and a :class:`PendingSave` is returned. At most one save
        is in flight, as for :meth:`save`; exit and SIGTERM wait for it.
        """
        if isinstance(step, bool) or not isinstance(step, int) or step < 0:
            raise ValueError(f"step must be a non-negative int, got {step!r}")
        self._writable("save")
        started = time.perf_counter()
        self.saver.wait()
        flags = self._flags(metadata, "files", pin=False)
        tx = self.options.transaction(step, metrics, flags, self.coordinator)
        tx.prepare = prepare
        tx.supersedes = supersedes
        tx.fail_fast = True  # ``write`` may be inside a framework's own collectives
        learn = self._link_unchanged(tx)
        if not blocking:
            return self._save_files_async(step, tx, write, started, also_keep, learn=learn)
        with tx:
            write(tx)
        learn()
        return self._after_commit(
            step,
            result_of(tx).path,
            committer=self.coordinator.rank == tx.committer,
            pin=False,
            also_keep=also_keep,
            coord=self.coordinator,
        )

    def _link_unchanged(self, tx: AtomicCheckpoint) -> Callable[[], None]:
        """Incremental framework saves: link the files a committed checkpoint holds.

        Wraps ``tx.prepare`` (it runs on each committer before the seal); returns what to
        call after the commit, which learns from the manifest which files were unchanged.
        """
        inc = self.incremental
        if inc is None:
            return lambda: None
        from ckptguard._state.reuse import link_unchanged_files  # noqa: PLC0415

        user = tx.prepare
        planned: list[tuple[Reuse | None, int]] = []

        def plan() -> Reuse | None:  # once per save: the framework's writes may ask first
            if not planned:
                planned.append(inc.plan(self.options.committed(), self.options.manifest_reader()))
            return planned[0][0]

        def prepare(staging: Path) -> None:
            if user is not None:
                user(staging)
            reuse = plan()
            if reuse is not None:  # on a store the files are spooled, then uploaded
                upload_to = tx.write_path if self.backend.remote else None
                link_unchanged_files(os.fspath(staging), reuse, tx.storage, tx.known,
                                     upload_to=upload_to)  # fmt: skip
            tx.metadata = with_incremental(tx.metadata, planned[0][1], reuse)

        def learn() -> None:
            if planned and tx.result is not None:
                manifest = tx.result.manifest
                prefix = f"{manifest.save_id}/"  # an object store's files are under it
                files = ((f.path.removeprefix(prefix), f.size, f.checksum) for f in manifest.files)
                inc.learn(planned[0][0], files)

        tx.prepare = prepare
        self._plans[tx] = plan
        return learn

    def reuse_for(self, tx: AtomicCheckpoint) -> Reuse | None:
        """What this framework save may link (incremental saves), for a committer.

        For integrations that know a file's content before it is written (the
        Trainer's frozen weights, ``integrations/_frozen.py``): a file linked with
        :meth:`Reuse.link` goes into ``tx.known`` under its path in the checkpoint. None
        on other ranks, and where this save is written in full.
        """
        plan = self._plans.get(tx)
        if plan is None or self.coordinator.rank != tx.committer:
            return None
        return plan()

    def _save_files_async(
        self,
        step: int,
        tx: AtomicCheckpoint,
        write: Callable[[AtomicCheckpoint], Any],
        started: float,
        also_keep: Collection[str],
        *,
        learn: Callable[[], None],
    ) -> PendingSave:
        finish = begin_transaction(tx, write)

        def work(coord: Coordinator) -> CheckpointInfo:
            finish_transaction(tx, finish if callable(finish) else None, coord)
            learn()
            return self._after_commit(
                step,
                result_of(tx).path,
                committer=coord.rank == tx.committer,
                pin=False,
                also_keep=also_keep,
                coord=coord,
            )

        path = self.backend.join(self.naming.name(step))
        job = PendingSave(step, path, time.perf_counter() - started)
        return self.saver.start_work(job, work)
