"""Saves on preemption for the frameworks: the Trainer, Lightning, Accelerate loops.

The signal handling and the agreement are the manager's (``_manager/preemption.py``):
the handler only records the signal; at each optimizer step every rank votes, and all
see the request at the same step. What each framework gets:

- Trainer (``protect(trainer)``, on by default): a callback whose ``on_step_end`` turns
  the agreed step into ``should_save`` and ``should_training_stop``; the Trainer saves
  that step through ckptguard (committed, exactly once) and leaves its loop; then the
  protected ``train()`` logs one line and raises ``SystemExit(PREEMPTED_EXIT_CODE)``.
- Lightning (:func:`lightning_callback`): ``on_train_batch_end`` saves the agreed step with
  ``trainer.save_checkpoint`` and stops the trainer; then it exits the same way.
- Accelerate (``protect(accelerator, preemption=True)``): the loop asks
  ``preemption_requested(accelerator, step)``, calls ``save_state()`` and
  ``exit_preempted(accelerator)``.

Frameworks that handle the signal themselves (Lightning installs SIGTERM and, on SLURM,
SIGUSR1 handlers in ``fit``) keep theirs: ckptguard's callback then also agrees on
Lightning's ``received_sigterm`` flag.
"""

from __future__ import annotations

import logging
import os
from typing import TYPE_CHECKING, Any

from ckptguard._format.layout import HF_NAMING
from ckptguard._manager.preemption import Handling, exit_preempted, policy_of

if TYPE_CHECKING:
    from collections.abc import Iterable

    from ckptguard._manager.manager import CheckpointManager

__all__ = ["TrainerPreemption", "handling_for"]

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
    """The Trainer's part: a callback for ``on_step_end``, and the exit after ``train()``."""

    def __init__(self, handling: Handling) -> None:
        self.handling = handling
        self.callback = _trainer_callback(handling)

    def exit_if_preempted(self, managers: Iterable[CheckpointManager]) -> None:
        """After ``train()``: if the ranks agreed, log the line and exit with the code."""
        step = self.handling.step
        if step is None:
            return
        found = None
        for manager in managers:
            path = manager.backend.join(HF_NAMING.name(step))
            if manager.backend.exists(path):
                found = path
        exit_preempted(step, found)


def _trainer_callback(handling: Handling) -> Any:
    from transformers import TrainerCallback  # noqa: PLC0415 - an optional extra

    class PreemptionCallback(TrainerCallback):
        """Save the step every rank agreed on, then stop training (ckptguard)."""

        def __init__(self, handling: Handling) -> None:
            self.handling = handling

        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> Any:
            del args, kwargs
            if self.handling.poll(int(state.global_step)):
                control.should_save = True
                control.should_training_stop = True
            return control

    return PreemptionCallback(handling)


def accelerate_requested(handling: Handling | None, step: int) -> bool:
    """Accelerate's ``preemption_requested``: refuses clearly without handling."""
    if handling is None:
        raise ValueError(
            "preemption_requested() needs protect(accelerator, preemption=True) (or the "
            "signal to handle)"
        )
    return handling.poll(step)


def exit_after(handling: Handling | None, path: str | None) -> None:
    """Log the preemption line (``path``: the committed checkpoint) and exit."""
    step = None if handling is None else handling.step
    exit_preempted(step, path if path is not None and os.path.exists(path) else None)
