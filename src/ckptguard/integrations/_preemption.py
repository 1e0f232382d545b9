"""Saves on preemption for the frameworks: the Trainer, Lightning, Accelerate loops.

The signal handling and the agreement are the manager's (``_manager/preemption.py``):
the handler only records the signal; at each optimizer step every rank votes, and all
see the request at the same step. What each framework gets:

- Trainer (``protect(trainer)``, on by default): a callback whose ``on_step_end`` turns
  the agreed step into ``should_save`` and ``should_training_stop``; the Trainer saves
  that step through ckptguard (committed, exactly once) and leaves its loop; then the
  protected ``train()`` logs one line and raises ``SystemExit(PREEMPTED_EXIT_CODE)``.
- Accelerate (``protect(accelerator, preemption=True)``, off by default: the loop must
  ask): the loop asks ``preemption_requested(accelerator, step)``, calls
  ``save_state()`` and ``exit_preempted(accelerator, path)``.
- Lightning (``SaveOnPreemption``, a callback, opt-in; ``_lightning_preemption.py``):
  its ``fit`` installs a SIGTERM handler of its own (and SIGUSR1 on SLURM with
  auto-requeue) that stops every rank with ``SIGTERMException`` at the next batch,
  without a save. The callback takes the named signals from it while the training loop
  runs, votes at each optimizer step's ``on_train_batch_end``, saves the agreed step with
  ``trainer.save_checkpoint`` (through ``AtomicCheckpointIO``), logs the line and raises
  ``SystemExit(PREEMPTED_EXIT_CODE)`` on every rank; Lightning's handlers come back at the
  end of training.
"""

from __future__ import annotations

import logging
import os
from typing import TYPE_CHECKING, Any, NoReturn

from ckptguard._format.layout import HF_NAMING
from ckptguard._manager.preemption import Handling, policy_of
from ckptguard._manager.preemption import exit_preempted as exit_preempted_line

if TYPE_CHECKING:
    from collections.abc import Iterable

    from ckptguard._manager.manager import CheckpointManager

__all__ = [
    "TrainerPreemption",
    "attach_to_accelerator",
    "exit_preempted",
    "handling_for",
    "preemption_requested",
]

_log = logging.getLogger("ckptguard.preemption")


def handling_for(spec: Any, who: str) -> Handling | None:
    """``preemption=`` of a framework's ``protect``: armed, or None (off, or refused).

    A framework's default must not break a program that handles the signal itself: such
    a program gets a warning and no preemption handling (``strict=False``).
    """
    policy = policy_of(spec)
    if policy is None:
        return None
    handling = Handling(policy, strict=False)
    if not handling.armed:
        _log.warning("%s: saves on preemption are off (see the warning above)", who)
        return None
    return handling


class TrainerPreemption:
    """The Trainer's part: armed while ``train()`` runs, a callback, the exit after it.

    Armed only while ``train()`` runs: a script that protects a trainer and only
    evaluates, or has finished training, keeps the signal's default action.
    """

    def __init__(self, spec: Any) -> None:
        self.spec = spec
        self.handling: Handling | None = None
        self.callback = _trainer_callback(self)

    def arm(self) -> None:
        """At the start of ``train()``."""
        if self.handling is None:
            self.handling = handling_for(self.spec, "protect(trainer)")

    def disarm(self) -> None:
        """At the end of ``train()``, unless a preemption was agreed (the exit follows)."""
        if self.handling is not None and self.handling.step is None:
            self.handling.close()
            self.handling = None

    def exit_if_preempted(self, managers: Iterable[CheckpointManager]) -> None:
        """After ``train()``: if the ranks agreed, log the line and exit with the code."""
        step = None if self.handling is None else self.handling.step
        if step is None:
            return
        found = None
        for manager in managers:
            path = manager.backend.join(HF_NAMING.name(step))
            if manager.backend.exists(path):
                found = path
        exit_preempted_line(step, found)


def _trainer_callback(owner: TrainerPreemption) -> Any:
    from transformers import TrainerCallback  # noqa: PLC0415 - an optional extra

    class PreemptionCallback(TrainerCallback):
        """Save the step every rank agreed on, then stop training (ckptguard)."""

        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> Any:
            del args, kwargs
            handling = owner.handling
            if handling is not None and handling.poll(int(state.global_step)):
                control.should_save = True
                control.should_training_stop = True
            return control

    return PreemptionCallback()


# -- Accelerate: the loop asks ----------------------------------------------------------------
_ACCELERATE_ATTR = "_ckptguard_preemption"


def attach_to_accelerator(accelerator: Any, spec: Any) -> None:
    """``protect(accelerator, preemption=...)``: arm, and keep the handling on it."""
    setattr(accelerator, _ACCELERATE_ATTR, handling_for(spec, "protect(accelerator)"))


def preemption_requested(accelerator: Any, step: int) -> bool:
    """Every rank, at every step boundary: whether to ``save_state()`` now and exit.

    True on every rank at the same step once any rank received the preemption signal of
    ``protect(accelerator, preemption=True)``.
    """
    handling = getattr(accelerator, _ACCELERATE_ATTR, None)
    if handling is None:
        raise ValueError(
            "preemption_requested() needs protect(accelerator, preemption=True) (or the "
            "signal to handle), in the main thread, without a handler of your own for it"
        )
    return bool(handling.poll(step))


def exit_preempted(accelerator: Any, path: str | os.PathLike[str] | None = None) -> NoReturn:
    """After the preemption ``save_state()``: log one line, exit with the code.

    ``path``: what ``save_state()`` returned (the committed checkpoint), for the line.
    Raises ``SystemExit(ckptguard.PREEMPTED_EXIT_CODE)``.
    """
    handling = getattr(accelerator, _ACCELERATE_ATTR, None)
    step = None if handling is None else handling.step
    text = None if path is None else os.fspath(path)
    exit_preempted_line(step, text if text is not None and os.path.exists(text) else None)
