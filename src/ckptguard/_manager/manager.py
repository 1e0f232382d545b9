"""CheckpointManager: save, restore, list, verify and retain training checkpoints.

::

    mgr = CheckpointManager("runs/exp1", keep_last=3, best_metric="eval_loss")
    mgr.save(step, {"model": model, "optimizer": opt, "rng": capture_rng_state()},
             metrics={"eval_loss": 0.41})
    state = mgr.restore(target={"model": model, "optimizer": opt})   # newest that verifies

Each save goes through the commit protocol (``commit.py``): written into a staging dir,
sealed, committed under its ``checkpoint-<step>`` name in one atomic rename. Retention
runs only after the new checkpoint is committed and verified, and never deletes the
newest valid checkpoint, the best one, a pinned one, or anything that is not valid.
Restore takes the newest checkpoint that verifies, and logs each one it skips and why.
"""

from __future__ import annotations

import atexit
import contextlib
import dataclasses
import logging
import math
import os
import signal
import threading
import time
import weakref
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal, overload

from ckptguard._coordination.base import (
    Coordinator,
    SingleProcess,
    default_coordinator,
    side_channel,
)
from ckptguard._errors import (
    CheckpointError,
    CheckpointNotFound,
    CorruptCheckpoint,
    NoValidCheckpoint,
    SaveAborted,
    StorageError,
    storage_error_from_os,
)
from ckptguard._format.layout import (
    HF_NAMING,
    META_DIR,
    Naming,
    RootLayout,
)
from ckptguard._manager.retention import Candidate, RetentionPolicy, select_deletions
from ckptguard._protocol.cleanup import DEFAULT_STALE_AFTER, retire_checkpoint
from ckptguard._protocol.commit import (
    AtomicCheckpoint,
    CommitResult,
    IfExists,
)
from ckptguard._protocol.locking import DEFAULT_LOCK_TIMEOUT, root_lock
from ckptguard._protocol.recovery import recover
from ckptguard._protocol.verify import VerifyReport, verify
from ckptguard._storage.local import LocalStorage, Storage
from ckptguard._storage.retry import DEFAULT_RETRY, RetryPolicy, call_save_with_retry, with_retries

if TYPE_CHECKING:
    from collections.abc import Callable, Collection, Mapping
    from pathlib import Path
    from types import FrameType

    from ckptguard._format.manifest import Manifest
    from ckptguard._manager.mirror import Mirror
    from ckptguard._state.serialization import EncodedState, StagingBuffers
    from ckptguard._storage.local import FileDigest
    from ckptguard._storage.objectstore import FsspecStorage

__all__ = ["CheckpointInfo", "CheckpointManager", "PendingSave"]

_log = logging.getLogger("ckptguard.manager")
PINS_DIR = "pins"
_RESERVED_METADATA = "ckptguard"


@dataclass(frozen=True)
class CheckpointInfo:
    """A checkpoint of a root, as ``list``/``latest`` report it."""

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

    def result(self, timeout: float | None = None) -> CheckpointInfo:
        """This info: ``save(...).result()`` reads the same for blocking and async saves."""
        del timeout
        return self

    def done(self) -> bool:
        """True: a blocking save has finished (see :meth:`PendingSave.done`)."""
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
            name=os.path.basename(report.path),
            files=len(m.files) if m else 0,
            pinned=pinned,
            checksums_verified=report.checksums and report.ok,
            problems=list(report.problems),
            save_id=m.save_id if m else None,
        )


def _flagged(metadata: Mapping[str, Any] | None, *, kind: str, pin: bool) -> dict[str, Any]:
    """The user's metadata plus ckptguard's own flags (how to restore it, whether pinned)."""
    out = dict(metadata or {})
    if _RESERVED_METADATA in out:
        raise ValueError(f"metadata key {_RESERVED_METADATA!r} is reserved")
    out[_RESERVED_METADATA] = {"kind": kind, "pinned": pin}
    return out


def _clean_metrics(metrics: Mapping[str, Any] | None) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, raw in (metrics or {}).items():
        value = raw.item() if callable(getattr(raw, "item", None)) else raw  # 0-d tensors
        if isinstance(value, float) and not math.isfinite(value):
            _log.warning("metric %r is %s; stored as a string, never counted as best", key, value)
            value = repr(value)
        out[str(key)] = value
    return out


class PendingSave:
    """An async save in flight (what ``save(..., blocking=False)`` returns).

    ``result()`` waits for the save and returns its :class:`CheckpointInfo`, or raises its
    error. ``stall_seconds`` is how long the training thread was blocked (the snapshot).
    """

    def __init__(self, step: int, path: str, stall_seconds: float) -> None:
        self.step, self.path, self.stall_seconds = step, path, stall_seconds
        self._done = threading.Event()
        self._info: CheckpointInfo | None = None
        self._error: BaseException | None = None
        self._reported = False  # raised to the caller once (by result, wait, save or close)
        self._thread: threading.Thread | None = None

    def _join(self, timeout: float | None = None) -> bool:
        """Wait until the save is finished and its thread has ended; False on timeout.

        The thread itself, not only the result: a thread still unwinding (releasing its
        tensors) while the interpreter shuts down aborts the process ("terminate called
        without an active exception"), as torch's C++ frames cannot be unwound then.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        if not self._done.wait(timeout):
            return False
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(None if deadline is None else max(0.0, deadline - time.monotonic()))
            return not thread.is_alive()
        return True

    def done(self) -> bool:
        """Whether the save has finished (committed or failed)."""
        return self._done.is_set()

    def result(self, timeout: float | None = None) -> CheckpointInfo:
        """Wait for the save; its CheckpointInfo, or its error raised (TimeoutError on timeout)."""
        if not self._join(timeout):
            raise TimeoutError(f"the async save of step {self.step} is still running")
        if self._error is not None:
            self._reported = True
            raise self._error
        if self._info is None:  # pragma: no cover - _finish always sets one of them
            raise RuntimeError("async save finished without a result")
        return self._info

    def _finish(self, info: CheckpointInfo | None, error: BaseException | None) -> None:
        self._info, self._error = info, error
        self._done.set()

    def __repr__(self) -> str:
        state = "running" if not self.done() else ("failed" if self._error else "committed")
        return f"PendingSave(step={self.step}, path={self.path!r}, {state})"


# Managers with an async save that may be in flight: finished (or given up) at exit.
_LIVE: weakref.WeakSet[CheckpointManager] = weakref.WeakSet()
_EXIT_LOCK = threading.Lock()
_sigterm_installed = False


def _finish_in_flight(why: str) -> None:
    """Let every in-flight async save finish, up to each manager's ``exit_timeout``."""
    for mgr in list(_LIVE):
        job = mgr._pending  # noqa: SLF001 - this module's own class
        if job is None:
            continue
        if job.done():
            job._join(mgr.exit_timeout)  # noqa: SLF001 - let its thread end before shutdown
            continue
        _log.warning(
            "%s: waiting up to %.0f s for the async save of step %d to %s to finish",
            why, mgr.exit_timeout, job.step, job.path,
        )  # fmt: skip
        if not job._join(mgr.exit_timeout):  # noqa: SLF001
            _log.error(
                "%s: gave up on the async save of step %d after %.0f s; nothing of it is "
                "visible (its staging dir is removed by the next start or `ckptguard clean`)",
                why, job.step, mgr.exit_timeout,
            )  # fmt: skip
        elif job._error is not None:  # noqa: SLF001
            _log.error("%s: the async save of step %d failed: %s", why, job.step, job._error)  # noqa: SLF001
    for mgr in list(_LIVE):  # then the mirror uploads (the saves above may have queued one)
        if mgr.mirror is not None and not mgr.mirror.drain(mgr.exit_timeout):
            _log.error(
                "%s: gave up waiting for the mirror uploads to %s after %.0f s",
                why, mgr.mirror.url, mgr.exit_timeout,
            )  # fmt: skip


def _at_exit() -> None:
    _finish_in_flight("process exit")


def _on_sigterm(signum: int, frame: FrameType | None) -> None:
    """Finish in-flight async saves, then die of SIGTERM as the default action would."""
    del frame
    _finish_in_flight("SIGTERM")
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    os.kill(os.getpid(), signum)


def _watch_exit(mgr: CheckpointManager) -> None:
    """Register ``mgr`` so that exit finishes its async saves.

    atexit always; SIGTERM too when the program has no handler of its own and this is the
    main thread.
    """
    global _sigterm_installed  # noqa: PLW0603 - one process-wide handler
    with _EXIT_LOCK:
        _LIVE.add(mgr)
        _hook_thread_shutdown()
        if _sigterm_installed or threading.current_thread() is not threading.main_thread():
            return
        if signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:
            signal.signal(signal.SIGTERM, _on_sigterm)
            _sigterm_installed = True


atexit.register(_at_exit)
_threading_exit_hooked = False


def _hook_thread_shutdown() -> None:
    """Also finish in-flight saves from threading's shutdown, before atexit handlers run.

    By the time ``atexit`` handlers run, ``concurrent.futures`` has refused new work
    ("cannot schedule new futures after interpreter shutdown"), which the background
    save still needs. ``threading._register_atexit`` is how ``concurrent.futures`` itself
    gets called at that point; hooks registered later run first. Where it is missing,
    the ``atexit`` handler is all there is.
    """
    global _threading_exit_hooked  # noqa: PLW0603 - once per process
    if _threading_exit_hooked:
        return
    register = getattr(threading, "_register_atexit", None)
    if callable(register):
        with contextlib.suppress(RuntimeError):  # already shutting down
            register(_at_exit)
    _threading_exit_hooked = True


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
    ) -> None:
        """Checkpoints of one run under ``root`` (see the module docstring).

        ``async_save=True``: ``save`` returns once the state is copied into staging buffers
        and writes, commits and retains in a background thread (``blocking=`` overrides it
        per save). ``exit_timeout``: how long process exit (atexit, SIGTERM) waits for an
        in-flight async save before giving up on it.

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

        ``check_environment``: run the fast part of :func:`ckptguard.doctor` at start
        (library versions, the root's contents) and log what it finds as warnings; also
        off with the environment variable ``CKPTGUARD_DOCTOR=0``.
        """
        root = os.fspath(root)
        from ckptguard._storage.objectstore import FsspecStorage, is_url  # noqa: PLC0415

        self.remote: FsspecStorage | None = None
        self.mirror: Mirror | None = None
        self._mirror_reader: CheckpointManager | None = None
        if is_url(root):
            if storage is not None:
                raise ValueError("storage= is for local roots; a URL root brings its own")
            if mirror is not None:
                raise ValueError("mirror= is for local roots: an object-store root is the copy")
            self.remote = FsspecStorage(root, storage_options)
        self.async_save = bool(async_save)
        self.verify_after_save = verify_after_save
        self.exit_timeout = exit_timeout
        self._pending: PendingSave | None = None
        self._buffers: StagingBuffers | None = None
        self._background: Coordinator | None = None
        self._committer: bool | None = None  # whether this rank committed the last save
        self.root = (
            self.remote.url if self.remote else os.path.abspath(root.removeprefix("file://"))
        )
        self.layout = RootLayout(self.root)
        self.policy = RetentionPolicy(keep_last, keep_best, best_metric, best_mode, keep_every)
        self.if_exists: IfExists = if_exists
        self.retry, self.lock_timeout, self.stale_after = retry, lock_timeout, stale_after
        self.storage: Storage = self.remote or with_retries(storage or LocalStorage(), retry)
        self.naming = naming
        self._verified: dict[str, str] = {}  # path -> save id checksum-verified by us
        # Under torch.distributed, one process per node repairs its root at startup; every
        # rank hears of any failure, so that no rank is left alone in a collective.
        self.coordinator = coordinator or default_coordinator()
        if mirror is not None:
            from ckptguard._manager.mirror import Mirror  # noqa: PLC0415

            self.mirror = Mirror(mirror, storage_options)
            try:
                self._mirror_reader = CheckpointManager(
                    self.mirror.url,
                    keep_last=None,
                    storage_options=storage_options,
                    coordinator=SingleProcess(),
                    naming=naming,
                    stale_after=stale_after,
                    check_environment=False,
                )
            except (CheckpointError, OSError) as exc:  # never stops a local run
                _log.warning("mirror %s unreachable at start (%s); resume uses local "
                             "checkpoints only", mirror, exc)  # fmt: skip
            _watch_exit(self)  # exit waits for queued uploads too
        error: str | None = None
        try:
            if self.remote is not None:
                if self.coordinator.rank == 0:
                    self._clean_remote()
            else:
                os.makedirs(self.root, exist_ok=True)
                if self.coordinator.local_rank == 0:
                    report = recover(
                        self.root, checksums=False, stale_after=stale_after, storage=self.storage
                    )
                    for action in report.actions:
                        _log.info("startup recovery: %s", action)
            if check_environment and self.coordinator.rank == 0:
                from ckptguard._tools.doctor import warn_at_start  # noqa: PLC0415

                warn_at_start(self.root, log=_log)
        except Exception as exc:
            if self.coordinator.world_size == 1:
                raise
            error = f"{type(exc).__name__}: {exc}"
        if self.coordinator.world_size > 1:
            errors = self.coordinator.all_gather(error)
            failures = {r: str(e) for r, e in enumerate(errors) if e is not None}
            if failures:
                raise SaveAborted(
                    f"starting the checkpoint manager on {self.root} failed on rank(s) "
                    f"{sorted(failures)}",
                    path=self.root,
                    failures=failures,
                )

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

        ``sharded=True``: every rank writes its shards through torch.distributed.checkpoint
        into one staging dir, committed once (see ``sharded.py``); always blocking.

        Under torch.distributed every rank calls this; each committer (rank 0 on a shared
        root, one rank per node on node-local roots) writes its state (the replicated state
        of data-parallel training) and commits, and every rank gets the same result, or the
        same :class:`SaveAborted`.
        """
        if isinstance(step, bool) or not isinstance(step, int) or step < 0:
            raise ValueError(f"step must be a non-negative int, got {step!r}")
        if blocking is None:
            blocking = not self.async_save or sharded
        elif not blocking and sharded:
            raise ValueError(
                "sharded=True saves are blocking (torch.distributed.checkpoint writes them); "
                "pass blocking=True, or leave blocking unset"
            )
        self._wait_save()  # at most one save in flight; raises the previous one's error
        if sharded:
            return self._save_sharded(step, state, metrics, metadata, pin=pin)
        if not blocking:
            return self._save_async(step, state, metrics, metadata, pin=pin)
        flagged = _flagged(metadata, kind="state", pin=pin)
        return self._commit_state(
            step, None, state, metrics, flagged, pin=pin, coord=self.coordinator
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
        """Every rank calls; each committer writes its state into the agreed staging dir.

        One committer for a shared root, one per node for node-local roots; ``metadata``
        is flagged already (``_flagged``). ``encoded``
        is the state ready to write (a snapshot for async saves); a committer without
        one encodes ``state`` (the training thread's, for blocking saves only).
        """
        from ckptguard._state.serialization import encode_state, write_encoded  # noqa: PLC0415

        if self.remote is not None:
            return self._commit_remote(
                step, encoded, state, metrics, metadata, pin=pin, coord=coord
            )

        def attempt() -> tuple[str, bool]:
            tx = self._transaction(step, metrics, metadata, coord)
            with tx as staging:
                committer = coord.rank == tx.committer
                self._committer = committer
                if committer:
                    snapshot = encoded
                    if snapshot is None:
                        if state is None:
                            raise RuntimeError(
                                f"rank {coord.rank} commits for its node this time but took "
                                "no snapshot (it did not commit the previous save); save again"
                            )
                        snapshot = encode_state(state)
                    tx.expected_bytes = snapshot.nbytes
                    tx.known.update(write_encoded(str(staging), snapshot, self.storage))
            return self._result(tx).path, committer

        if coord.world_size == 1:
            # One process: a save that a transient error aborted is made again from scratch.
            final = os.path.join(self.root, self.naming.name(step))
            path, committer = call_save_with_retry(attempt, final=final, policy=self.retry)
        else:
            path, committer = attempt()
        return self._after_commit(step, path, committer=committer, pin=pin, coord=coord)

    def _commit_remote(
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
        """The object-store commit: rank 0 uploads, then writes the manifest (the commit)."""
        from ckptguard._state.serialization import encode_state, write_encoded  # noqa: PLC0415
        from ckptguard._storage.objectstore import commit_remote  # noqa: PLC0415

        if self.remote is None:  # pragma: no cover - only called for URL roots
            raise RuntimeError("not an object-store root")
        remote = self.remote

        def write(prefix: str) -> Mapping[str, FileDigest]:
            ready = encoded if encoded is not None else encode_state(state)
            return write_encoded(prefix, ready, remote)

        path = f"{self.root}/{self.naming.name(step)}"
        commit_remote(
            remote,
            path,
            write,
            step=step,
            metrics=_clean_metrics(metrics),
            metadata=metadata,
            if_exists=self.if_exists,
            coordinator=coord,
        )
        self._committer = coord.rank == 0
        return self._after_commit(step, path, committer=coord.rank == 0, pin=pin, coord=coord)

    def _clean_remote(self) -> None:
        """Startup clean-up of an object-store root.

        Saves no manifest refers to (killed mid-upload, replaced, or losing a race), once
        older than ``stale_after``.
        """
        from ckptguard._storage.objectstore import clean_remote  # noqa: PLC0415

        if self.remote is None:  # pragma: no cover
            return
        for removed in clean_remote(self.remote, self.root, grace=self.stale_after):
            _log.info("startup clean-up: removed %s (no manifest refers to it)", removed)

    def _local_only(self, what: str) -> None:
        if self.remote is not None:
            raise NotImplementedError(
                f"{what} on an object-store root ({self.root}) are not supported yet: "
                "save on a local or shared filesystem root"
            )

    def _verify_path(self, path: str, *, checksums: bool = True) -> VerifyReport:
        """verify() for a local checkpoint, or its object-store counterpart."""
        if self.remote is not None:
            from ckptguard._storage.objectstore import verify_remote  # noqa: PLC0415

            return verify_remote(self.remote, path, checksums=checksums)
        # A checkpoint of this root is found by its name, which gives its step.
        return verify(path, checksums=checksums, expect_name=os.path.basename(path))

    def _join(self, name: str) -> str:
        return f"{self.root}/{name}" if self.remote is not None else os.path.join(self.root, name)

    def _save_async(
        self,
        step: int,
        state: Any,
        metrics: Mapping[str, Any] | None,
        metadata: Mapping[str, Any] | None,
        *,
        pin: bool,
    ) -> PendingSave:
        """Snapshot on this thread; write, commit and retain on a background thread."""
        from ckptguard._state.serialization import StagingBuffers, encode_state  # noqa: PLC0415

        started = time.perf_counter()
        if self._background is None:
            self._background = side_channel(self.coordinator, "async")
        if self._buffers is None:
            self._buffers = StagingBuffers()
        clean, flagged = _clean_metrics(metrics), _flagged(metadata, kind="state", pin=pin)
        # Only a rank that may commit keeps a copy: after the first save, the ranks that
        # committed it (one per node at most); before it, every rank.
        snapshot = None
        if self._committer is not False:
            snapshot = self._buffers.snapshot(encode_state(state))
        else:
            self._buffers.release()
        job = PendingSave(
            step,
            os.path.join(self.root, self.naming.name(step)),
            time.perf_counter() - started,
        )
        self._pending = job
        _watch_exit(self)
        worker = threading.Thread(
            target=self._run_in_background,
            args=(job, snapshot, clean, flagged, pin, self._background),
            name=f"ckptguard-save-{step}",
            daemon=True,  # exit waits for it explicitly (atexit, SIGTERM), up to exit_timeout
        )
        job._thread = worker  # noqa: SLF001
        worker.start()
        return job

    def _run_in_background(  # noqa: PLR0917 - the thread's arguments
        self,
        job: PendingSave,
        snapshot: EncodedState | None,
        metrics: dict[str, Any],
        metadata: dict[str, Any],
        pin: bool,  # noqa: FBT001 - positional thread argument
        coord: Coordinator,
    ) -> None:
        try:
            info = self._commit_state(
                job.step, snapshot, None, metrics, metadata, pin=pin, coord=coord
            )
        except BaseException as exc:
            _log.error(
                "async save of step %d to %s failed: %s: %s (raised again by the next "
                "save, wait or close)",
                job.step, job.path, type(exc).__name__, exc,
            )  # fmt: skip
            job._finish(None, exc)  # noqa: SLF001
        else:
            job._finish(info, None)  # noqa: SLF001
        if not self._committer and self._buffers is not None:
            self._buffers.release()  # a rank that did not commit needs no copy

    def wait(self, timeout: float | None = None) -> CheckpointInfo | None:
        """Finish the in-flight async save: its CheckpointInfo, or its error raised.

        None when no save is in flight (or its result was already taken). A failed save is
        raised once, by whichever of ``wait``, ``save``, ``close`` or
        ``PendingSave.result`` comes first. With a mirror, also waits for every queued
        upload and raises the first mirroring failure since the last ``wait``.
        """
        info = self._wait_save(timeout)
        if self.mirror is not None:
            self.mirror.wait()
        return info

    def _wait_save(self, timeout: float | None = None) -> CheckpointInfo | None:
        job = self._pending
        if job is None:
            return None
        if not job._join(timeout):  # noqa: SLF001
            raise TimeoutError(f"the async save of step {job.step} is still running")
        self._pending = None
        if job._error is not None:  # noqa: SLF001
            if job._reported:  # noqa: SLF001
                return None
            job._reported = True  # noqa: SLF001
            raise job._error  # noqa: SLF001
        return job._info  # noqa: SLF001

    def close(self) -> None:
        """Finish the in-flight save (raising its error), then free the staging buffers."""
        try:
            self.wait()
        finally:
            if self.mirror is not None:
                self.mirror.close()
            if self._buffers is not None:
                self._buffers.release()
            with _EXIT_LOCK:
                _LIVE.discard(self)

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

    def save_files(
        self,
        step: int,
        write: Callable[[AtomicCheckpoint], None],
        metrics: Mapping[str, Any] | None = None,
        metadata: Mapping[str, Any] | None = None,
        *,
        prepare: Callable[[Path], None] | None = None,
        also_keep: Collection[str] = (),
        supersedes: str | None = None,
    ) -> CheckpointInfo:
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
        """
        if isinstance(step, bool) or not isinstance(step, int) or step < 0:
            raise ValueError(f"step must be a non-negative int, got {step!r}")
        self._local_only("save_files")
        self._wait_save()
        tx = self._transaction(
            step, metrics, _flagged(metadata, kind="files", pin=False), self.coordinator
        )
        tx.prepare = prepare
        tx.supersedes = supersedes
        tx.fail_fast = True  # ``write`` may be inside a framework's own collectives
        with tx:
            write(tx)
        return self._after_commit(
            step,
            self._result(tx).path,
            committer=self.coordinator.rank == tx.committer,
            pin=False,
            also_keep=also_keep,
            coord=self.coordinator,
        )

    def _transaction(
        self,
        step: int,
        metrics: Mapping[str, Any] | None,
        metadata: dict[str, Any],
        coord: Coordinator,
    ) -> AtomicCheckpoint:
        """The coordinated commit of the checkpoint of ``step`` with this manager's settings."""
        return AtomicCheckpoint(
            os.path.join(self.root, self.naming.name(step)),
            step=step,
            metrics=_clean_metrics(metrics),
            metadata=metadata,
            if_exists=self.if_exists,
            storage=self.storage,
            retry=self.retry,
            lock_timeout=self.lock_timeout,
            stale_after=self.stale_after,
            coordinator=coord,
        )

    @staticmethod
    def _result(tx: AtomicCheckpoint) -> CommitResult:
        if tx.result is None:  # pragma: no cover - __exit__ either sets it or raises
            raise RuntimeError("save finished without a result")
        return tx.result

    def _verify_new(self, path: str) -> VerifyReport:
        """Check a checkpoint just committed; raise if it does not verify.

        Sizes and structure always; checksums too with ``verify_after_save``. Either way
        it counts as verified for retention: its checksums were taken from the bytes
        written (see ``__init__``).
        """
        report = self._verify_path(path, checksums=self.verify_after_save)
        if (not report.ok or report.manifest is None) and self.remote is None:
            # Another process sharing the root may be replacing this name with a newer save,
            # between its two renames (the name is briefly absent): it does so under the
            # root's lock, so look again holding it. A valid newer save is no corruption;
            # its bytes were not written by us, so every checksum is checked before
            # retention relies on it.
            with root_lock(self.layout, self.lock_timeout):
                report = self._verify_path(path, checksums=True)
            if report.ok:
                _log.info("%s was replaced by a newer save of another process", path)
        if not report.ok or report.manifest is None:
            raise CorruptCheckpoint(
                f"{path} failed verification right after its commit",
                path=path,
                problems=report.problems,
            )
        self._verified[path] = report.manifest.save_id
        return report

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
        """Verify the new checkpoint, then apply retention; each committer does both.

        Nothing is deleted on the strength of a save that does not verify. With one
        process, failures raise; with several, they are logged on every rank (the commit
        itself has succeeded by then, on every node).
        """
        error: str | None = None
        report: VerifyReport | None = None
        if committer:
            try:
                report = self._verify_new(path)
                if self.mirror is not None and coord.rank == 0:
                    self.mirror.upload(path)
                self._retain_after(path, also_keep)
            except Exception as exc:
                if coord.world_size == 1:
                    raise
                error = f"{type(exc).__name__}: {exc}"
        if coord.world_size > 1:
            for rank, err in enumerate(coord.all_gather(error)):
                if err is not None:
                    _log.warning("after committing %s, rank %d failed: %s", path, rank, err)
        if report is None:
            report = self._verify_path(path, checksums=False)
        return CheckpointInfo.from_report(step, report, pinned=pin or self._pin_file(step))

    def _retain_after(self, path: str, also_keep: Collection[str]) -> None:
        """Retention after the commit of ``path``; a storage failure is raised typed."""
        try:
            self._apply_retention(os.path.basename(path), also_keep)
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

        self._local_only("sharded=True saves")
        coord = self.coordinator
        tx = self._transaction(step, metrics, _flagged(metadata, kind=KIND, pin=pin), coord)
        with tx as staging:
            write_shards(tx, staging, state)
        path = self._result(tx).path
        return self._after_commit(step, path, committer=coord.rank == 0, pin=pin, coord=coord)

    # -- reading ---------------------------------------------------------------------------
    def _committed(self) -> list[tuple[int, str]]:
        """(step, path) of every ``checkpoint-<step>`` entry, newest first."""
        found = []
        if self.remote is not None:
            from ckptguard._storage.objectstore import committed_names  # noqa: PLC0415

            names = committed_names(self.remote, self.root)
        else:
            names = self.storage.list_dir(self.root)
        for name in names:
            step = self.naming.step(name)
            if step is not None and name != META_DIR:
                found.append((step, self._join(name)))
        return sorted(found, reverse=True)

    def _pin_file(self, step: int) -> bool:
        return self.storage.exists(self._join(f"{META_DIR}/{PINS_DIR}/{self.naming.name(step)}"))

    def _pinned(self, step: int, manifest: Manifest | None) -> bool:
        flags = manifest.metadata.get(_RESERVED_METADATA, {}) if manifest else {}
        return bool(isinstance(flags, dict) and flags.get("pinned")) or self._pin_file(step)

    def list(self, *, checksums: bool = False) -> list[CheckpointInfo]:
        """Every ``checkpoint-<step>`` of the root, oldest first.

        Sizes and structure are checked; checksums too with ``checksums=True``.
        """
        infos = []
        for step, path in reversed(self._committed()):
            report = self._verify_path(path, checksums=checksums)
            infos.append(
                CheckpointInfo.from_report(step, report, pinned=self._pinned(step, report.manifest))
            )
        return infos

    def latest(self) -> CheckpointInfo | None:
        """The newest checkpoint that verifies (checksums included); logs each one skipped.

        With a mirror: the newer of the local and the mirror's (local on a tie).
        """
        local = None
        for step, path in self._committed():
            report = self._verify_path(path)
            if report.ok:
                local = CheckpointInfo.from_report(
                    step, report, pinned=self._pinned(step, report.manifest)
                )
                break
            _log.warning("skipping %s: %s", path, "; ".join(report.problems))
        if self._mirror_reader is not None:
            try:
                remote = self._mirror_reader.latest()
            except (CheckpointError, OSError) as exc:
                _log.warning("mirror unreachable (%s): local checkpoints only", exc)
                remote = None
            if remote is not None and (local is None or remote.step > local.step):
                return remote
        return local

    def verify(self, step: int | None = None) -> VerifyReport:
        """Verify one checkpoint (default: the newest, valid or not)."""
        committed = self._committed()
        if step is None:
            if not committed:
                raise NoValidCheckpoint(f"no checkpoints in {self.root}", path=self.root)
            return self._verify_path(committed[0][1])
        path = self._join(self.naming.name(step))
        if not self.storage.exists(path):
            raise CheckpointNotFound(f"no checkpoint for step {step}", path=path)
        return self._verify_path(path)

    def restore(self, step: int | None = None, target: Any = None) -> Any:
        """Load a checkpoint (default: the newest that verifies), into ``target`` if given.

        Every byte is checked against the manifest before anything is loaded into the
        target. With ``step=None`` a corrupt checkpoint is skipped (and logged) in favour of
        the next older one; an explicit ``step`` that does not verify raises.
        """
        from ckptguard._state.serialization import read_state  # noqa: PLC0415 - may import torch

        if step is not None:
            path = self._join(self.naming.name(step))
            if self._mirror_reader is not None and not self.storage.exists(path):
                return self._mirror_reader.restore(step, target)
            return self._restore_one(path, target, read_state)
        skipped = []
        candidates: list[tuple[int, int, str, CheckpointManager]] = [
            (s, 1, p, self) for s, p in self._committed()
        ]
        if self._mirror_reader is not None:
            mirror = self._mirror_reader
            try:
                candidates += [(s, 0, p, mirror) for s, p in mirror._committed()]  # noqa: SLF001
            except (CheckpointError, OSError) as exc:
                _log.warning("mirror unreachable (%s): local checkpoints only", exc)
        for _step, _local, path, owner in sorted(candidates, reverse=True):
            try:
                state = owner._restore_one(path, target, read_state)  # noqa: SLF001
            except StorageError as exc:
                if owner is self:
                    raise
                _log.warning("skipping the mirror's %s: %s", path, exc.message)
                continue
            except CorruptCheckpoint as exc:
                _log.warning("skipping %s: %s", path, exc.message)
                skipped.append(f"{os.path.basename(path)}: {exc.message}")
                continue
            _log.info(
                "restored %s%s",
                path,
                f" (skipped {len(skipped)} newer: invalid)" if skipped else "",
            )
            return state
        raise NoValidCheckpoint(
            f"no checkpoint in {self.root} verifies"
            + (f" (rejected: {'; '.join(skipped)})" if skipped else ""),
            path=self.root,
        )

    def _restore_one(self, path: str, target: Any, read_state: Any) -> Any:
        # structure first: missing/extra/sizes/manifest
        report = self._verify_path(path, checksums=False)
        if not report.ok or report.manifest is None:
            if not self.storage.exists(path):
                raise CheckpointNotFound(f"no checkpoint at {path}", path=path)
            raise CorruptCheckpoint(
                f"{path} does not verify: {'; '.join(report.problems)}",
                path=path,
                problems=report.problems,
            )
        flags = report.manifest.metadata.get(_RESERVED_METADATA, {})
        if isinstance(flags, dict) and flags.get("kind") == "files":
            raise CheckpointError(
                f"{path} holds a framework's own files, not a state saved by "
                "CheckpointManager.save",
                path=path,
                hint="load it with the framework that wrote it (its directory is verified)",
            )
        if isinstance(flags, dict) and flags.get("kind") == "dcp":
            from ckptguard._state.sharded import restore_sharded  # noqa: PLC0415 - imports torch

            return restore_sharded(path, target)
        if self.remote is not None:
            from ckptguard._storage.objectstore import remote_read_args  # noqa: PLC0415

            base, manifest, opener = remote_read_args(self.remote, path, report.manifest)
            return read_state(base, manifest, target=target, opener=opener)
        return read_state(path, report.manifest, target=target)  # checks every checksum

    # -- retention -------------------------------------------------------------------------
    def pin(self, step: int) -> None:
        """Keep ``checkpoint-<step>`` whatever the retention policy says."""
        pins = self._join(f"{META_DIR}/{PINS_DIR}")
        self.storage.make_dir(pins, mode=0o700, exist_ok=True)
        path = f"{pins}/{self.naming.name(step)}"
        if not self.storage.exists(path):
            self.storage.write_bytes(path, b"", fsync=True)
            self.storage.fsync_dir(pins)

    def unpin(self, step: int) -> None:
        """Undo :meth:`pin` (a checkpoint saved with ``pin=True`` stays pinned)."""
        self.storage.remove_file(self._join(f"{META_DIR}/{PINS_DIR}/{self.naming.name(step)}"))

    def _fully_verified(self, path: str, save_id: str) -> bool:
        """Checksum-verify a checkpoint once per save id in this process (then cached)."""
        if self._verified.get(path) == save_id:
            return True
        report = self._verify_path(path)
        if report.ok:
            self._verified[path] = save_id
        else:
            _log.warning("%s does not verify: %s", path, "; ".join(report.problems))
        return report.ok

    def _apply_retention(self, just_saved: str, also_keep: Collection[str] = ()) -> None:
        lock = (
            contextlib.nullcontext()
            if self.remote is not None
            else root_lock(self.layout, self.lock_timeout)
        )
        with lock:
            candidates: dict[str, Candidate] = {}
            save_ids: dict[str, str] = {}
            for step, path in self._committed():
                report = self._verify_path(path, checksums=False)
                name = os.path.basename(path)
                metric = None
                if report.manifest is not None:
                    save_ids[name] = report.manifest.save_id
                    if self.policy.best_metric is not None:
                        value = report.manifest.metrics.get(self.policy.best_metric)
                        if isinstance(value, (int, float)) and not isinstance(value, bool):
                            try:
                                metric = float(value)
                            except OverflowError:  # an int beyond float: not a usable metric
                                metric = None
                pinned = (
                    self._pinned(step, report.manifest) or name == just_saved or name in also_keep
                )
                candidates[name] = Candidate(name, step, report.ok, metric, pinned)
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
                kept = [c for c in candidates.values() if c.valid and c.name not in deletions]
                doubtful = [
                    c
                    for c in kept
                    if not self._fully_verified(os.path.join(self.root, c.name), save_ids[c.name])
                ]
                if not doubtful:
                    break
                for c in doubtful:
                    candidates[c.name] = dataclasses.replace(c, valid=False)
            for name in deletions:
                self._retire(name)

    def _retire(self, name: str) -> None:
        if self.mirror is not None and self.coordinator.rank == 0:
            self.mirror.retire(name)
        if self.remote is not None:
            from ckptguard._storage.objectstore import retire_remote  # noqa: PLC0415

            retire_remote(self.remote, self._join(name))
            return
        retire_checkpoint(self.layout, name, storage=self.storage, retry=self.retry)
