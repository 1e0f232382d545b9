"""Saves on preemption: a signal becomes one save at a step boundary every rank agrees on.

::

    mgr = CheckpointManager("runs/exp1", preemption=True)      # or "SIGUSR1", [...]
    for step in range(start, steps):
        train_step()
        if mgr.preemption_requested(step):    # every rank, at every step boundary
            mgr.save(step, state)
            mgr.exit_preempted()              # logs, raises SystemExit(PREEMPTED_EXIT_CODE)

Guarantees:

- The signal handler only records the request (a flag and a byte written to a pipe) and
  returns; it waits on nothing, takes no lock and saves nothing. Saves inside a signal
  handler deadlock on locks the interrupted code holds (issue 15, ``saver.py``) and fail
  intermittently in Lightning's; the save runs in the training loop, where it is safe.
- :func:`Agreement.poll` returns True on every rank at the same step, as soon as any rank
  received the signal before that step's exchange: one vote over the process group's
  key-value store every ``check_every`` steps (a rank that got the signal just after the
  exchange is heard at the next one). No collective on the training's backend.
- A loop that never reaches a step boundary within ``grace`` seconds of the signal is
  given up on, as a program without preemption handling would be: the in-flight async
  save is finished (``saver.py``'s exit path) and the process ends by the signal's default
  action, also when the main thread is stuck in native code (the watcher learns of the
  signal from Python's wakeup fd). Repeats of the signal are ignored (see below).

Partial: the vote is synchronous; a rank that stops calling ``preemption_requested``
(its loop ended early) leaves the others waiting in the store's ``get`` until the store's
timeout.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, NoReturn

from ckptguard._coordination.base import default_coordinator, side_channel

if TYPE_CHECKING:
    from types import FrameType

    from ckptguard._coordination.base import Coordinator

__all__ = [
    "DEFAULT_CHECK_EVERY",
    "DEFAULT_GRACE",
    "PREEMPTED_EXIT_CODE",
    "Agreement",
    "Handling",
    "Preemption",
    "arm",
    "disarm",
    "policy_of",
]

_log = logging.getLogger("ckptguard.preemption")

# sysexits.h EX_TEMPFAIL, "temporary failure, the user is invited to retry": a preempted
# job is not finished, and not broken. Not 0 (a scheduler or torchrun would see a finished
# job and never requeue it), not 1 (any Python error), not 128+N (death by a signal).
PREEMPTED_EXIT_CODE = 75
"""The exit code after a save on preemption: 75, ``EX_TEMPFAIL`` ("try again later")."""
# The default time from the signal to the step boundary. SLURM (KillWait), Kubernetes
# (terminationGracePeriodSeconds) and torchrun (its workers after it got SIGTERM) all
# SIGKILL 30 s after SIGTERM by default: the fallback must start before that, with time
# left to finish an in-flight async save.
DEFAULT_GRACE = 20.0
# Every step: the vote costs tens of microseconds (benchmarks/bench_preemption.py), and a
# step boundary every N steps adds up to N steps of latency inside the grace period.
DEFAULT_CHECK_EVERY = 1


def _signal_of(spec: str | int | signal.Signals) -> signal.Signals:
    """``"SIGUSR1"``, ``"USR1"``, ``10`` or ``signal.SIGUSR1`` as a ``signal.Signals``."""
    if isinstance(spec, bool):
        raise TypeError(f"not a signal: {spec!r}")
    if isinstance(spec, str):
        name = spec.upper()
        name = name if name.startswith("SIG") else f"SIG{name}"
        if name not in signal.Signals.__members__:
            raise ValueError(f"unknown signal {spec!r} (expected a name such as 'SIGUSR1')")
        return signal.Signals[name]
    try:
        return signal.Signals(spec)
    except ValueError:
        raise ValueError(f"unknown signal number {spec!r}") from None


@dataclass(frozen=True)
class Preemption:
    """What to treat as a preemption request, and how long to wait for the loop.

    ``signals``: the signals that request a save (SIGTERM by default; SLURM's
    ``--signal=USR1@90`` sends SIGUSR1 90 s before the end). ``grace``: seconds from the
    signal within which the training loop must reach a step boundary that every rank
    agrees on; after it, the in-flight async save is finished and the process ends by the
    signal. ``check_every``: the ranks vote at steps divisible by it.
    """

    signals: tuple[signal.Signals, ...] = (signal.SIGTERM,)
    grace: float = DEFAULT_GRACE
    check_every: int = DEFAULT_CHECK_EVERY

    def __post_init__(self) -> None:
        if not self.signals:
            raise ValueError("Preemption needs at least one signal")
        object.__setattr__(self, "signals", tuple(_signal_of(s) for s in self.signals))
        if self.grace <= 0:
            raise ValueError(f"grace must be > 0 seconds, got {self.grace!r}")
        if isinstance(self.check_every, bool) or self.check_every < 1:
            raise ValueError(f"check_every must be an int >= 1, got {self.check_every!r}")


def policy_of(spec: Any) -> Preemption | None:
    """``preemption=`` as a policy: False/None (off), True (SIGTERM), signal(s), a policy."""
    if spec is None or spec is False:
        return None
    if spec is True:
        return Preemption()
    if isinstance(spec, Preemption):
        return spec
    if isinstance(spec, (str, int, signal.Signals)):
        return Preemption(signals=(_signal_of(spec),))
    try:
        signals = tuple(_signal_of(s) for s in spec)
    except TypeError:
        raise TypeError(
            "preemption must be True/False, a signal name or number, a sequence of them, "
            f"or a ckptguard.Preemption; got {spec!r}"
        ) from None
    return Preemption(signals=signals)


# -- the signal handler and its watcher (process-wide: signals are) ----------------------------
@dataclass
class _Requests:
    """What the handler recorded, and who is armed for which signal."""

    signum: int = 0  # the first signal received (0: none); set by the handler only
    received_at: float = 0.0
    wake_write: int = -1
    acknowledged: threading.Event = field(default_factory=threading.Event)
    previous: dict[int, Any] = field(default_factory=dict)  # signal -> handler replaced
    users: dict[int, int] = field(default_factory=dict)  # signal -> arm() calls not disarmed
    grace: float = DEFAULT_GRACE


_REQ = _Requests()
_LOCK = threading.Lock()


# Why repeats are ignored (saver.py's SIGTERM handler ends the process on the second
# one): torchrun forwards its SIGTERM to the workers, which a scheduler (SLURM's step,
# a container's process group) may have signalled already: one preemption reaches a
# worker twice, milliseconds apart. The grace period and the scheduler's SIGKILL bound
# the wait instead.
#
# Why a wakeup fd too: Python runs a handler only when the main thread next executes
# bytecode. A main thread blocked in native code (a collective waiting for a dead peer,
# a store read) never runs it, and the grace fallback exists for exactly that loop.
# Python's C-level handler writes the signal's number to the wakeup fd at once; the
# watcher thread reads it there. Where the program set a wakeup fd of its own (asyncio),
# it is left alone and only the handler's byte wakes the watcher.
def _on_signal(signum: int, frame: FrameType | None) -> None:
    """Record the request and wake the watcher; never wait (see ``saver.py``)."""
    del frame
    if not _REQ.signum:
        _REQ.received_at = time.monotonic()
        _REQ.signum = signum
    with contextlib.suppress(OSError):  # a full pipe: the watcher is awake already
        os.write(_REQ.wake_write, bytes([signum]))


def _watch(wake_read: int) -> None:
    """The watcher thread: note the request; after the grace period, fall back."""
    from ckptguard._manager.saver import wakeups  # noqa: PLC0415 - a cycle otherwise

    watching = False
    for signum in wakeups(wake_read):
        if watching or not _REQ.users.get(signum):  # a repeat, or another signal's wakeup
            continue
        watching = True
        if not _REQ.signum:  # the main thread has not run the handler yet
            _REQ.received_at = time.monotonic()
            _REQ.signum = signum
        grace = _REQ.grace
        _log.warning(
            "received %s: saving at the next step boundary that every rank agrees on "
            "(within %.0f s)", signal.Signals(signum).name, grace,
        )  # fmt: skip
        left = grace - (time.monotonic() - _REQ.received_at)
        if not _REQ.acknowledged.wait(max(0.0, left)):
            _give_up(signum, grace)


def _give_up(signum: int, grace: float) -> None:
    """The loop missed the grace period: behave as without preemption handling."""
    from ckptguard._manager.saver import _finish_in_flight  # noqa: PLC0415 - a cycle otherwise

    name = signal.Signals(signum).name
    _log.error(
        "%s: the training loop reached no step boundary within %.0f s; finishing the "
        "in-flight async save (if any), then ending the process by %s",
        name, grace, name,
    )  # fmt: skip
    try:
        _finish_in_flight(f"{name} (preemption grace period over)")
    finally:
        _die_of(signum)


def _die_of(signum: int) -> None:
    """End the process by ``signum``'s default action, from a thread other than the main.

    ``signal.signal`` works only in the main thread, which may be stuck in native code:
    the C library's ``signal`` resets the disposition process-wide. If that fails, exit
    as a shell reports a death by that signal.
    """
    import ctypes  # noqa: PLC0415 - only here

    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.signal.restype = ctypes.c_void_p
        libc.signal(ctypes.c_int(signum), ctypes.c_void_p(0))  # SIG_DFL
        logging.shutdown()
        os.kill(os.getpid(), signum)
        time.sleep(5)  # the signal ends the process meanwhile
    finally:
        os._exit(128 + signum)


def _ours(handler: Any) -> bool:
    """Whether ``handler`` is ckptguard's (this module's, or the async saver's SIGTERM one)."""
    saver = sys.modules.get("ckptguard._manager.saver")
    return handler is _on_signal or (saver is not None and handler is saver._on_sigterm)  # noqa: SLF001


def arm(policy: Preemption, *, strict: bool) -> bool:
    """Install the handler for ``policy.signals``; False (with a warning) if it cannot.

    It cannot from a thread other than the main one (Python's rule), nor over a handler
    the program installed itself: ``strict`` raises then, else a warning says why the
    signal is left alone. ckptguard's own SIGTERM handler for async saves is replaced (the
    grace fallback does what it did).
    """
    with _LOCK:
        problem = None
        if threading.current_thread() is not threading.main_thread():
            problem = "signal handlers can only be installed from the main thread"
        else:
            for sig in policy.signals:
                current = signal.getsignal(sig)
                if current is not signal.SIG_DFL and not _ours(current):
                    problem = (
                        f"the program already handles {sig.name} ({current!r}); ckptguard "
                        "does not replace a program's own handler"
                    )
                    break
        if problem is not None:
            hint = (
                "create the manager (or protect the trainer) in the main thread, without a "
                "handler of your own for that signal, or pass preemption=False and call "
                "save yourself from your handler's flag"
            )
            if strict:
                raise RuntimeError(f"cannot handle preemption: {problem}; {hint}")
            _log.warning("preemption handling is off: %s", problem)
            return False
        if _REQ.wake_write < 0:
            wake_read, _REQ.wake_write = os.pipe()
            os.set_blocking(_REQ.wake_write, False)
            threading.Thread(
                target=_watch, args=(wake_read,), name="ckptguard-preemption", daemon=True
            ).start()
            old = signal.set_wakeup_fd(_REQ.wake_write, warn_on_full_buffer=False)
            if old != -1:  # the program's own (asyncio): keep it
                signal.set_wakeup_fd(old)
        _REQ.grace = min(_REQ.grace, policy.grace) if _REQ.users else policy.grace
        for sig in policy.signals:
            if not _REQ.users.get(sig):
                _REQ.previous[sig] = signal.getsignal(sig)
                signal.signal(sig, _on_signal)
            _REQ.users[sig] = _REQ.users.get(sig, 0) + 1
        return True


def disarm(policy: Preemption) -> None:
    """Undo one :func:`arm`: the last user of a signal restores the handler it replaced."""
    with _LOCK:
        for sig in policy.signals:
            users = _REQ.users.get(sig, 0) - 1
            if users > 0:
                _REQ.users[sig] = users
                continue
            _REQ.users.pop(sig, None)
            previous = _REQ.previous.pop(sig, signal.SIG_DFL)
            if threading.current_thread() is threading.main_thread() and not _REQ.signum:
                signal.signal(sig, previous)


def received() -> int:
    """The signal this process received (0: none yet)."""
    return _REQ.signum


# -- agreement -------------------------------------------------------------------------------
class _StoreVote:
    """An all-reduce(any) of one flag per rank over the process group's key-value store.

    Round ``r``: each rank adds ``1 + (world+1)*flag`` to one counter; the value it gets
    back says how many ranks arrived (``value % (world+1)``). The last rank to arrive
    publishes the total, which the others read (a blocking ``get``): two store round trips
    a rank, O(world) store work a round, whatever the number of ranks. The last arrival
    also deletes the previous round's two keys: every rank has read them (it arrived
    here). Why the store and not a gloo all_reduce: gloo work left in its threads aborts
    processes at exit (``_coordination/distributed.py``), and NCCL jobs get no new threads.
    """

    def __init__(self) -> None:
        import torch.distributed as dist  # noqa: PLC0415 - only with a process group

        store = dist.distributed_c10d._get_default_store()  # noqa: SLF001 - the PG's store
        clone = getattr(store, "clone", None)
        with contextlib.suppress(RuntimeError, NotImplementedError):
            store = clone() if callable(clone) else store  # a connection of its own
        self.store = store
        self.world = int(dist.get_world_size())
        ticket = int(store.add(f"ckptguard/preempt/tickets/{self.world}", 1))
        self.prefix = f"ckptguard/preempt/{self.world}/{(ticket - 1) // self.world}/"
        self.round = 0

    def any(self, flag: bool) -> bool:  # noqa: FBT001 - the one vote
        key = f"{self.prefix}{self.round}"
        self.round += 1
        base = self.world + 1
        total = int(self.store.add(key, 1 + base * int(flag)))
        if total % base == self.world:  # the last to arrive: the total is final
            self.store.set(f"{key}/all", str(total))
            if self.round > 1:
                previous = f"{self.prefix}{self.round - 2}"
                self.store.delete_key(previous)
                self.store.delete_key(f"{previous}/all")
        else:
            total = int(self.store.get(f"{key}/all"))
        return total // base > 0


class Agreement:
    """One rank's view of whether, and at which step, the ranks agreed to stop and save.

    ``coordinator``: the ranks that vote; None takes torch.distributed's default group (or
    a single process) at the first vote, when a framework has initialised it.
    """

    def __init__(self, policy: Preemption, coordinator: Coordinator | None = None) -> None:
        self.policy = policy
        self.coordinator = coordinator
        self.step: int | None = None  # the agreed step, once agreed
        self._vote: Any = None

    def poll(self, step: int) -> bool:
        """Every rank, at every step boundary: True on every rank at the same step."""
        if self.step is not None:
            return True
        if step % self.policy.check_every:
            return False
        if self.coordinator is None:
            self.coordinator = default_coordinator()
        mine = bool(_REQ.signum)
        if self.coordinator.world_size > 1:
            mine = self._any(self.coordinator, mine)
        if mine:
            self.step = step
            _REQ.acknowledged.set()
            if self.coordinator.rank == 0:
                _log.warning(
                    "preemption (%s) agreed by all %d ranks at step %d: saving there",
                    self.signal_name, self.coordinator.world_size, step,
                )  # fmt: skip
        return mine

    def _any(self, coordinator: Coordinator, flag: bool) -> bool:  # noqa: FBT001
        if self._vote is None:
            distributed = sys.modules.get("ckptguard._coordination.distributed")
            if distributed is not None and isinstance(coordinator, distributed.TorchCoordinator):
                self._vote = _StoreVote()
            else:  # another coordinator: its own all_gather, on a channel of its own
                channel = side_channel(coordinator, "preempt")
                self._vote = lambda f: any(channel.all_gather(f))
        if isinstance(self._vote, _StoreVote):
            return self._vote.any(flag)
        return bool(self._vote(flag))

    @property
    def signal_name(self) -> str:
        """The signal this process received, or ``a peer's signal``."""
        return signal.Signals(_REQ.signum).name if _REQ.signum else "a peer's signal"


def exit_preempted(step: int | None, checkpoint: str | None) -> NoReturn:
    """Log the one preemption line and raise ``SystemExit(PREEMPTED_EXIT_CODE)``."""
    name = signal.Signals(_REQ.signum).name if _REQ.signum else "a peer's signal"
    where = checkpoint if checkpoint is not None else "no checkpoint of that step"
    _log.warning(
        "preempted by %s at step %s: committed %s; exiting with code %d",
        name, step, where, PREEMPTED_EXIT_CODE,
    )  # fmt: skip
    raise SystemExit(PREEMPTED_EXIT_CODE)


class Handling:
    """One user's preemption handling (a manager's, a protected trainer's): armed, agreed.

    ``strict``: refuse (RuntimeError) when the handler cannot be installed; else warn and
    stay off (``armed`` False: ``poll`` then agrees only on a peer's signal).
    """

    def __init__(
        self, policy: Preemption, coordinator: Coordinator | None = None, *, strict: bool
    ) -> None:
        self.policy = policy
        self.armed = arm(policy, strict=strict)
        self.agreement = Agreement(policy, coordinator)

    def poll(self, step: int) -> bool:
        """See :meth:`Agreement.poll`."""
        return self.agreement.poll(step)

    @property
    def step(self) -> int | None:
        """The agreed step (None until the ranks agreed)."""
        return self.agreement.step

    def close(self) -> None:
        """Restore the signal handlers replaced (once)."""
        if self.armed:
            self.armed = False
            disarm(self.policy)
