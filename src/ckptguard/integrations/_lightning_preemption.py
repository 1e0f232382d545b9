"""Saves on preemption for Lightning: the ``SaveOnPreemption`` callback.

::

    trainer = lightning.Trainer(plugins=[AtomicCheckpointIO()],
                                callbacks=[ModelCheckpoint(dirpath="ckpts/"), SaveOnPreemption()])
    trainer.fit(model, ckpt_path=last_valid_checkpoint("ckpts/"))   # exits 75 if preempted

Guarantees (the signal handling and the agreement are the manager's,
``_manager/preemption.py``):

- While ``fit`` runs its sanity check and its training loop (``on_sanity_check_start``,
  or ``on_train_start`` without a sanity check, to the end of training), the named
  signals (SIGTERM by default) are ckptguard's, not Lightning's: Lightning's handler (which
  sets ``trainer.received_sigterm`` and stops every rank at the next batch with
  ``SIGTERMException``, without a save, and broadcasts from inside the handler) does not
  run. At the end of training Lightning's handlers are put back, and its own teardown
  restores what the program had before ``fit``.
- After each optimizer step (``on_train_batch_end`` where ``global_step`` moved) every
  rank votes over the process group's store; all see the request at the same step. That
  step is saved with ``trainer.save_checkpoint`` (so through ``AtomicCheckpointIO``:
  committed and checksummed) under the name ``ModelCheckpoint`` gives that step; with
  ``async_save=True`` global rank 0 waits for the background commit.
- Then every rank logs ``preempted by SIGTERM at step N: committed PATH; exiting with code
  75`` and raises ``SystemExit(PREEMPTED_EXIT_CODE)`` from the callback, at the same step:
  Lightning ends ``fit`` as on its own SIGTERM (``on_exception`` hooks, teardown, signal
  handlers restored) and re-raises; a script that does not catch it exits with 75.

Why an exception and not ``trainer.should_stop``: Lightning ignores ``should_stop`` until
``min_epochs``/``min_steps`` are met (a preempted job would train on past its save), and a
stop through it runs the epoch's end first (a validation run, ``ModelCheckpoint``'s
epoch-end and ``last.ckpt`` saves) inside the scheduler's grace period. Lightning itself
ends ``fit`` on SIGTERM with a ``SystemExit`` (``SIGTERMException``) on every rank.

A SIGTERM that Lightning's handler took between its registration and the swap (a
moment) is sent again, to ckptguard's, and Lightning's flag cleared.

Partial: a save that fails on global rank 0 raises there, and the other ranks wait in
``save_checkpoint``'s barrier (as for any failed Lightning save) until the scheduler's
SIGKILL; a signal before Lightning installs its handlers in ``fit`` (setup, restoring a
checkpoint) meets the program's handler (by default, the end of the process); a repeat of
the signal after Lightning's teardown restored the handlers (the last moments before the
exit) ends the process by the signal's default action.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
from typing import TYPE_CHECKING, Any

import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint

from ckptguard._manager.preemption import (
    DEFAULT_CHECK_EVERY,
    DEFAULT_GRACE,
    Handling,
    Preemption,
    received,
)
from ckptguard._manager.preemption import exit_preempted as exit_preempted_line

if TYPE_CHECKING:
    from collections.abc import Iterable

__all__ = ["SaveOnPreemption"]

_log = logging.getLogger("ckptguard.preemption")


def _atomic_io(trainer: Any) -> Any:
    """The trainer's ``AtomicCheckpointIO`` (under Lightning's wrappers), or None."""
    from ckptguard.integrations.lightning import AtomicCheckpointIO  # noqa: PLC0415 - a cycle

    io = trainer.strategy.checkpoint_io
    for _ in range(8):  # _WrappingCheckpointIO (Lightning's AsyncCheckpointIO) wraps another
        if isinstance(io, AtomicCheckpointIO):
            return io
        io = getattr(io, "checkpoint_io", None)
    return None


class SaveOnPreemption(Callback):
    """On a preemption signal, save the step every rank agrees on, then exit with 75.

    ``signals``: a name, number or sequence of them (``"SIGTERM"``; SLURM's
    ``--signal=USR1@90`` sends ``"SIGUSR1"``: naming it takes SIGUSR1 from Lightning's
    auto-requeue handler too). ``grace``: seconds from the signal within which the loop
    must reach an agreed step boundary; after it, an in-flight async save is finished and
    the process ends by the signal. ``check_every``: the ranks vote at steps divisible by
    it. ``dirpath``: where to save (default: the first ``ModelCheckpoint``'s directory and
    its name for the step, else ``default_root_dir/checkpoints``).

    Needs ``AtomicCheckpointIO`` in the Trainer's plugins (checked at ``fit``'s setup).
    Raises ``RuntimeError`` when ``fit`` takes the signals (its sanity check, or the start
    of training) where they cannot be taken: not the main thread, or the program handled
    one before ``fit``. A process that agreed on a preemption stays preempted: a later
    ``fit`` saves and exits at its first step.
    """

    def __init__(
        self,
        signals: str | int | signal.Signals | Iterable[str | int | signal.Signals] = "SIGTERM",
        *,
        grace: float = DEFAULT_GRACE,
        check_every: int = DEFAULT_CHECK_EVERY,
        dirpath: str | os.PathLike[str] | None = None,
    ) -> None:
        spec = (signals,) if isinstance(signals, (str, int, signal.Signals)) else tuple(signals)
        self.policy = Preemption(signals=spec, grace=grace, check_every=check_every)  # type: ignore[arg-type]
        self.dirpath = None if dirpath is None else os.fspath(dirpath)
        self.handling: Handling | None = None
        self._lightning: dict[signal.Signals, Any] = {}  # Lightning's handlers, while ours
        self._last_step: int | None = None

    # -- hooks ---------------------------------------------------------------------------
    def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
        del pl_module
        if stage == "fit" and _atomic_io(trainer) is None:
            raise ValueError(
                "SaveOnPreemption saves through ckptguard: add AtomicCheckpointIO to the "
                "Trainer, Trainer(plugins=[AtomicCheckpointIO()], callbacks=[..., "
                "SaveOnPreemption()])"
            )

    def on_sanity_check_start(self, trainer: Any, pl_module: Any) -> None:
        del pl_module
        self._take_signals(trainer)  # fit's first hook after Lightning installed its handlers

    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        del pl_module
        self._take_signals(trainer)
        self._last_step = int(trainer.global_step)

    def on_train_batch_end(self, trainer: Any, *args: Any) -> None:
        del args
        step = int(trainer.global_step)
        if self.handling is None or step == self._last_step:
            return  # not armed, or no optimizer step since the last vote (accumulation)
        self._last_step = step
        if self.handling.poll(step):
            self._save_and_exit(trainer, step)

    def on_train_end(self, trainer: Any, pl_module: Any) -> None:
        del trainer, pl_module
        self._give_back()

    def on_exception(self, trainer: Any, pl_module: Any, exception: BaseException) -> None:
        del trainer, pl_module, exception
        self._give_back()

    def teardown(self, trainer: Any, pl_module: Any, stage: str) -> None:
        del trainer, pl_module, stage
        self._give_back()

    # -- the signals: Lightning's while it is not training, ckptguard's while it is --------
    def _take_signals(self, trainer: Any) -> None:
        if self.handling is not None:
            return
        if threading.current_thread() is not threading.main_thread():
            raise RuntimeError(
                "SaveOnPreemption cannot handle preemption: signal handlers can only be "
                "installed from the main thread; run trainer.fit in the main thread"
            )
        connector = trainer._signal_connector  # noqa: SLF001 - Lightning's handlers
        before_fit = getattr(connector, "_original_handlers", {})
        sigs = list(self.policy.signals)
        # Blocked during the swap: a signal in between is delivered to ours at the end.
        signal.pthread_sigmask(signal.SIG_BLOCK, sigs)
        try:
            for sig in sigs:
                self._lightning[sig] = signal.getsignal(sig)
                # What the program had before fit (Lightning composed it into its own):
                # ckptguard refuses to replace a program's own handler.
                original = before_fit.get(sig, signal.SIG_DFL)
                signal.signal(sig, signal.SIG_DFL if original is None else original)
            try:
                self.handling = Handling(self.policy, strict=True)
            except RuntimeError as exc:
                self._restore_lightning()
                problem = str(exc).split("; create the manager", 1)[0]  # the manager's hint
                raise RuntimeError(
                    f"SaveOnPreemption {problem}; run trainer.fit in the main thread without a "
                    "handler of your own for that signal, or leave SaveOnPreemption out and "
                    "save from your handler's flag"
                ) from None
        finally:
            signal.pthread_sigmask(signal.SIG_UNBLOCK, sigs)
        if signal.SIGTERM in sigs and getattr(connector, "received_sigterm", False):
            # Lightning's handler got it before the swap: ours gets it again instead, and
            # Lightning's flag (which would raise SIGTERMException) is cleared.
            connector.received_sigterm = False
            os.kill(os.getpid(), signal.SIGTERM)

    def _restore_lightning(self) -> None:
        for sig, handler in self._lightning.items():
            if handler is not None:
                signal.signal(sig, handler)
        self._lightning = {}

    def _give_back(self) -> None:
        """The end of training: ckptguard's handlers out, Lightning's back (once).

        After an agreed preemption nothing is given back: the exit follows, and a repeat of
        the signal meanwhile is ignored (until Lightning's teardown restores the handlers
        the program had before ``fit``).
        """
        handling = self.handling
        if handling is None or handling.step is not None:
            return
        self.handling = None
        handling.close()
        if threading.current_thread() is threading.main_thread() and not received():
            self._restore_lightning()
        else:
            self._lightning = {}

    # -- the save ------------------------------------------------------------------------
    def _path(self, trainer: Any, step: int) -> str:
        epoch = int(trainer.current_epoch)
        checkpoint = trainer.checkpoint_callback
        if self.dirpath is None and isinstance(checkpoint, ModelCheckpoint) and checkpoint.dirpath:
            metrics = dict(trainer.callback_metrics)
            metrics["epoch"] = torch.tensor(epoch)
            metrics["step"] = torch.tensor(step)
            path = checkpoint.format_checkpoint_name(metrics)
        else:
            dirpath = self.dirpath or os.path.join(trainer.default_root_dir, "checkpoints")
            path = os.path.join(dirpath, f"epoch={epoch}-step={step}.ckpt")
        return str(trainer.strategy.broadcast(path, src=0))  # one name on every rank

    def _save_and_exit(self, trainer: Any, step: int) -> None:
        path = self._path(trainer, step)
        trainer.save_checkpoint(path, weights_only=False)  # every rank; global rank 0 writes
        error: BaseException | None = None
        if trainer.is_global_zero:
            try:
                _atomic_io(trainer).wait()  # async_save=True: the background commit
            except BaseException as exc:  # told to the other ranks first, then raised
                error = exc
        committed = bool(trainer.strategy.broadcast(error is None, src=0))
        if error is not None:
            raise error
        exit_preempted_line(step, path if committed else None)
