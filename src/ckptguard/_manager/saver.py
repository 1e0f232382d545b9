"""Async saves: the save in flight, and finishing it at exit (atexit, SIGTERM).

``save(..., blocking=False)`` returns a :class:`PendingSave` once the state's tensors are
copied into reused staging buffers; a background thread writes, commits and retains.
At most one save is in flight per manager. Process exit and SIGTERM wait for it, up to
the manager's ``exit_timeout``.
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import os
import signal
import threading
import time
import weakref
from typing import TYPE_CHECKING, Any

from ckptguard._coordination.base import side_channel

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator
    from types import FrameType

    from ckptguard._coordination.base import Coordinator
    from ckptguard._manager.catalog import CheckpointInfo
    from ckptguard._protocol.transaction import AtomicCheckpoint
    from ckptguard._state.procwriter import WriterProcess
    from ckptguard._state.serialization import EncodedState, StagingBuffers

    # (step, snapshot, state, metrics, metadata, pin=, coord=) -> the committed info
    Commit = Callable[..., CheckpointInfo]

__all__ = ["AsyncSaver", "PendingSave", "forget", "watch_exit"]

_log = logging.getLogger("ckptguard.manager")


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
_LIVE: weakref.WeakSet[Any] = weakref.WeakSet()  # CheckpointManagers
_EXIT_LOCK = threading.Lock()
_sigterm_installed = False


def _finish_in_flight(why: str) -> None:
    """Let every in-flight async save finish, up to each manager's ``exit_timeout``."""
    for mgr in list(_LIVE):
        job: PendingSave | None = mgr.in_flight
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


# -- SIGTERM --------------------------------------------------------------------------------
# Which waits a signal can interrupt, and why each is safe:
# - Any wait of the main thread (PendingSave.result, save, wait, close: Event.wait and
#   Thread.join) can be interrupted by SIGTERM, at any bytecode, even while it holds the
#   lock of the Event's Condition (between "with self._cond" and "self._cond.wait()").
#   So the handler waits on nothing: it only writes a byte to a pipe (os.write: no Python
#   lock) and returns, and the interrupted wait goes on as before. A handler that waited on
#   the same Event deadlocked: it blocked on the Condition lock its own thread held, and
#   the save's thread then blocked in Event.set (issue 15).
# - The watcher thread, blocked in os.read on that pipe, does the waiting, in a thread
#   of its own: each in-flight save up to its manager's exit_timeout, then the mirror
#   uploads up to the same; then it re-sends SIGTERM, whose default action ends the
#   process as the scheduler expects. The handler restored that default action first,
#   so a second SIGTERM ends the process at once (a save cut there stays invisible).
# - atexit and threading's shutdown hooks run in the main thread outside any handler:
#   their waits are bounded by exit_timeout and hold no lock a save needs.
_wake_write = -1


def _on_sigterm(signum: int, frame: FrameType | None) -> None:
    """Wake the watcher (it finishes in-flight saves, then re-sends SIGTERM); never wait."""
    del frame
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # a second SIGTERM: the default action
    with contextlib.suppress(OSError):  # a full pipe: the watcher is awake already
        os.write(_wake_write, bytes([signum]))


def wakeups(wake_read: int) -> Iterator[int]:
    """The signal numbers a handler writes to a watcher's pipe, one at a time."""
    while True:
        try:
            data = os.read(wake_read, 1)
        except InterruptedError:  # pragma: no cover - PEP 475 retries read(2) itself
            continue
        if not data:  # pragma: no cover - the write end is never closed
            return
        yield data[0]


def _watch_sigterm(wake_read: int) -> None:
    """The watcher thread: on SIGTERM, finish in-flight saves, then die of SIGTERM."""
    for signum in wakeups(wake_read):
        try:
            _finish_in_flight("SIGTERM")
        finally:
            os.kill(os.getpid(), signum)


def _install_sigterm() -> None:
    """The handler and its watcher; the caller holds _EXIT_LOCK in the main thread."""
    global _wake_write
    wake_read, _wake_write = os.pipe()
    os.set_blocking(_wake_write, False)
    threading.Thread(
        target=_watch_sigterm, args=(wake_read,), name="ckptguard-sigterm", daemon=True
    ).start()
    signal.signal(signal.SIGTERM, _on_sigterm)


def watch_exit(mgr: Any) -> None:
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
            _install_sigterm()
            _sigterm_installed = True


def forget(mgr: Any) -> None:
    """A closed manager: nothing of it is left for exit to finish."""
    with _EXIT_LOCK:
        _LIVE.discard(mgr)


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


def begin_transaction(tx: AtomicCheckpoint, write: Callable[[AtomicCheckpoint], Any]) -> Any:
    """Enter ``tx`` and run ``write(tx)`` on this thread; returns what ``write`` returned.

    That is a ``finish`` for :func:`finish_transaction`, or None. On an error the save is
    aborted and the error raised.
    """
    tx.__enter__()
    try:
        return write(tx)
    except BaseException as exc:
        tx.__exit__(type(exc), exc, exc.__traceback__)
        raise


def finish_transaction(
    tx: AtomicCheckpoint, finish: Callable[[], None] | None, coord: Coordinator
) -> None:
    """Finish a framework save begun on the training thread, in the background.

    ``tx`` was entered there (its staging exists and the framework wrote into it);
    ``finish()`` makes the deferred writes, then the transaction flushes, seals and
    commits over ``coord`` (the side channel: every rank learns of any rank's failure).
    """
    tx.continue_on(coord)
    try:
        if finish is not None:
            finish()
    except BaseException as exc:
        tx.__exit__(type(exc), exc, exc.__traceback__)
        raise
    tx.__exit__(None, None, None)


class BackgroundSaves:
    """Async saves outside a manager (Accelerate's ``save_state(dir)``, Lightning's files).

    At most one in flight; process exit and SIGTERM wait for it as for a manager's
    (``watch_exit`` asks for ``in_flight``, ``exit_timeout`` and ``mirror``).
    """

    mirror = None

    def __init__(self, coordinator: Coordinator, exit_timeout: float = 120.0) -> None:
        self.exit_timeout = exit_timeout
        self.saver = AsyncSaver(self, coordinator, _no_state)

    @property
    def in_flight(self) -> PendingSave | None:
        return self.saver.pending

    def start(
        self,
        step: int,
        path: str,
        work: Callable[[Coordinator], CheckpointInfo | None],
        stall: float,
    ) -> PendingSave:
        """Wait for the save in flight (raising its error), then run ``work`` as the next."""
        self.saver.wait()
        return self.saver.start_work(PendingSave(step, path, stall), work)

    def wait(self, timeout: float | None = None) -> None:
        """Finish the save in flight; raise its error (once)."""
        self.saver.wait(timeout)


def _no_state(*_args: Any, **_kwargs: Any) -> CheckpointInfo:
    raise RuntimeError("background saves of files commit no state")  # pragma: no cover


class AsyncSaver:
    """A manager's background saves: at most one in flight, staging buffers reused.

    The training thread snapshots the state into the buffers (``start``); a thread then
    runs the manager's commit with that snapshot. ``wait`` returns its result or raises
    its error, once. With a ``writer`` (``async_writer="process"``), the buffers are
    shared with that process, which writes the tensor files while the thread waits.
    """

    def __init__(
        self,
        owner: Any,
        coordinator: Coordinator,
        commit: Commit,
        writer: WriterProcess | None = None,
    ) -> None:
        self.owner = owner  # the manager: exit finishes its save
        self.coordinator = coordinator
        self._commit = commit
        self.writer = writer
        self.split_frozen = False  # incremental saves: frozen parameters in files of their own
        # incremental saves: leaves the frozen files a committed checkpoint holds out of the
        # snapshot (``serialization.prelink_frozen``)
        self.prelink: Callable[[EncodedState], EncodedState] | None = None
        self.pending: PendingSave | None = None
        self.committer: bool | None = None  # whether this rank committed the last save
        self._buffers: StagingBuffers | None = None
        self._background: Coordinator | None = None

    def start(
        self,
        step: int,
        path: str,
        state: Any,
        metrics: dict[str, Any],
        metadata: dict[str, Any],
        *,
        pin: bool,
    ) -> PendingSave:
        """Snapshot on this thread; write, commit and retain on a background thread."""
        from ckptguard._state.serialization import StagingBuffers, encode_state  # noqa: PLC0415 - torch

        started = time.perf_counter()
        if self._background is None:
            self._background = side_channel(self.coordinator, "async")
        if self._buffers is None:
            self._buffers = StagingBuffers(shared=self.writer is not None)
        # Only a rank that may commit keeps a copy: after the first save, the ranks that
        # committed it (one per node at most); before it, every rank.
        snapshot = None
        if self.committer is not False:
            encoded = encode_state(state, split_frozen=self.split_frozen)
            if self.prelink is not None:
                encoded = self.prelink(encoded)
            snapshot = self._buffers.snapshot(encoded)
            if self.writer is not None:
                snapshot.writer = self.writer.write
        else:
            self._buffers.release()
        job = PendingSave(step, path, time.perf_counter() - started)
        self.pending = job
        watch_exit(self.owner)
        worker = threading.Thread(
            target=self._run,
            args=(job, snapshot, metrics, metadata, pin, self._background),
            name=f"ckptguard-save-{step}",
            daemon=True,  # exit waits for it explicitly (atexit, SIGTERM), up to exit_timeout
        )
        job._thread = worker  # noqa: SLF001 - this module's own class
        worker.start()
        return job

    def start_work(
        self, job: PendingSave, work: Callable[[Coordinator], CheckpointInfo | None]
    ) -> PendingSave:
        """Run ``work(side_channel)`` in the background as the save ``job``; returns it.

        ``work`` finishes a save the caller began (see :func:`finish_transaction`); its
        collectives go over the side channel, beside the training's own.
        """
        if self._background is None:
            self._background = side_channel(self.coordinator, "async")
        self.pending = job
        watch_exit(self.owner)
        worker = threading.Thread(
            target=self._run_work,
            args=(job, work, self._background),
            name=f"ckptguard-save-{job.step}",
            daemon=True,  # exit waits for it explicitly (atexit, SIGTERM), up to exit_timeout
        )
        job._thread = worker  # noqa: SLF001 - this module's own class
        worker.start()
        return job

    def _run_work(
        self,
        job: PendingSave,
        work: Callable[[Coordinator], CheckpointInfo | None],
        coord: Coordinator,
    ) -> None:
        try:
            info = work(coord)
        except BaseException as exc:
            _log.error(
                "async save of step %d to %s failed: %s: %s (raised again by the next "
                "save, wait or close)",
                job.step, job.path, type(exc).__name__, exc,
            )  # fmt: skip
            job._finish(None, exc)  # noqa: SLF001
        else:
            job._finish(info, None)  # noqa: SLF001

    def _run(  # noqa: PLR0917 - the thread's arguments
        self,
        job: PendingSave,
        snapshot: EncodedState | None,
        metrics: dict[str, Any],
        metadata: dict[str, Any],
        pin: bool,  # noqa: FBT001 - positional thread argument
        coord: Coordinator,
    ) -> None:
        def commit(coord: Coordinator) -> CheckpointInfo:
            return self._commit(job.step, snapshot, None, metrics, metadata, pin=pin, coord=coord)

        self._run_work(job, commit, coord)
        if not self.committer and self._buffers is not None:
            self._buffers.release()  # a rank that did not commit needs no copy

    def wait(self, timeout: float | None = None) -> CheckpointInfo | None:
        """The in-flight save's info, or its error raised (once); None if there is none."""
        job = self.pending
        if job is None:
            return None
        if not job._join(timeout):  # noqa: SLF001
            raise TimeoutError(f"the async save of step {job.step} is still running")
        self.pending = None
        if job._error is not None:  # noqa: SLF001
            if job._reported:  # noqa: SLF001
                return None
            job._reported = True  # noqa: SLF001
            raise job._error  # noqa: SLF001
        return job._info  # noqa: SLF001

    def release(self) -> None:
        """Free the staging buffers; end the writer process."""
        if self._buffers is not None:
            self._buffers.release()
        if self.writer is not None:
            self.writer.close()
