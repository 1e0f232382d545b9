"""Simulated power loss: the machine dies at every storage operation of a run of saves.

``ckptguard.testing.FaultyStorage(track=root)`` records what each fsync made durable; a
``power_cut`` fault at the k-th operation stops the run, and ``power_loss()`` rewrites the
root to its durable image (unsynced data and unsynced directory entries dropped). Then a
fresh manager, on plain storage, must find every checkpoint whose save returned, intact,
and resume from the newest valid one, and the next save must work.

Rows:
- the claim, with ``CheckpointManager.save`` (sync and async) and ``atomic_checkpoint``;
- the same at each named protocol step (``cut_power_at``);
- control: the same sweep with every fsync skipped (``ignore_fsync=True``) must lose a
  checkpoint whose save had returned, which shows the check can fail.
"""

from __future__ import annotations

import os
import random
from typing import TYPE_CHECKING, Any

import numpy as np

import ckptguard
from ckptguard._format.layout import RootLayout
from ckptguard.testing import PROTOCOL_STEPS, Fault, FaultyStorage, PowerCut, cut_power_at
from gauntlet import Row, same

if TYPE_CHECKING:
    from collections.abc import Callable
    from pathlib import Path

KEEP = 2
CLAIM = "power cut at every storage operation: checkpoints whose save returned lost = 0"


def _state(step: int) -> dict[str, Any]:
    rng = np.random.default_rng(step)
    return {"w": rng.standard_normal(257).astype(np.float32), "b": np.full(3, step), "step": step}


def _manager_saver(async_save: bool, keep: int = KEEP) -> Callable[[str, FaultyStorage, int], None]:
    def save(root: str, storage: FaultyStorage, step: int) -> None:
        mgr = ckptguard.CheckpointManager(
            root, keep_last=keep, storage=storage, async_save=async_save, check_environment=False
        )
        try:
            mgr.save(step, _state(step))
            mgr.wait()
        finally:
            if not storage.dead:
                mgr.close()

    return save


def _atomic_saver(root: str, storage: FaultyStorage, step: int) -> None:
    with ckptguard.atomic_checkpoint(
        os.path.join(root, f"checkpoint-{step}"), step=step, storage=storage
    ) as staging:
        np.save(staging / "w.npy", _state(step)["w"])
        (staging / "note.txt").write_text(f"step {step}\n")


def _check_atomic(path: str, step: int) -> str | None:
    w = np.load(os.path.join(path, "w.npy"))
    if not same(w, _state(step)["w"]):
        return f"checkpoint-{step}: w.npy differs from what was saved"
    return None


# What each control skips, given the prefix of its roots (``<prefix>-<k>``).
def _root_only(prefix: Path) -> Callable[[str], bool]:
    return lambda path: path.startswith(f"{prefix}-") and "/" not in path[len(str(prefix)) :]


CONTROLS: list[tuple[str, Callable[[Path], bool | str | Callable[[str], bool]]]] = [
    ("every fsync", lambda _prefix: True),
    ("the fsync of the data files", lambda _prefix: "*/.ckptguard/staging/*/*"),
    ("the fsync of the root after the rename", _root_only),
]


def _run(
    root: str,
    save: Callable[[str, FaultyStorage, int], None],
    fault: Fault | None,
    *,
    ignore_fsync: bool | str | Callable[[str], bool] = False,
    step_cut: str | None = None,
    steps: int = 3,
) -> tuple[list[int], bool]:
    """Save steps 1..n until the power is cut; the steps whose save returned, and whether
    the power was cut at all."""
    storage = FaultyStorage(track=root, faults=[fault] if fault else [], ignore_fsync=ignore_fsync)
    returned: list[int] = []
    cut = False
    try:
        for step in range(1, steps + 1):
            if step_cut is not None and step == steps:
                with cut_power_at(step_cut, storage):
                    save(root, storage, step)
            else:
                save(root, storage, step)
            returned.append(step)
    except PowerCut:
        cut = True
    if cut or ignore_fsync is not False:
        storage.power_loss()
    return returned, cut


def _judge(root: str, returned: list[int], *, atomic: bool, keep: int | None = KEEP) -> str | None:
    """The claims after the machine came back; a description of the first that fails."""
    mgr = ckptguard.CheckpointManager(root, keep_last=KEEP, check_environment=False)
    try:
        valid = {info.step: info for info in mgr.list(checksums=True) if info.valid}
        listed = {info.step for info in mgr.list()}
        if listed - set(valid):
            return (
                f"a checkpoint name that does not verify is visible: {sorted(listed - set(valid))}"
            )
        # Retention after a later commit may retire a returned save: only the newest KEEP of
        # the saves that returned or committed must be there (all of them without retention).
        kept = sorted(set(returned) | set(valid))[-keep if keep else 0 :]
        for step in (s for s in returned if s in kept):
            if step not in valid:
                return f"checkpoint-{step} was saved (save returned) but is gone or invalid"
        latest = mgr.latest()
        newest = max(valid, default=None)
        if (latest.step if latest else None) != newest:
            return f"latest() is {latest and latest.step}, the newest valid is {newest}"
        for step, info in valid.items():
            if atomic:
                problem = _check_atomic(info.path, step)
                if problem:
                    return problem
            elif not same(mgr.restore(step), _state(step)):
                return f"checkpoint-{step} restores to a different state"
        if atomic:
            _atomic_saver(root, FaultyStorage(), 99)
        else:
            mgr.save(99, _state(99))
        leftovers = os.listdir(RootLayout(root).staging)
        if leftovers:
            return f"the next save left staging behind: {leftovers}"
    finally:
        mgr.close()
    return None


def _sweep(
    row: Row,
    work: Path,
    label: str,
    save: Callable[[str, FaultyStorage, int], None],
    *,
    atomic: bool,
    stride: int,
    ignore_fsync: bool | str | Callable[[str], bool] = False,
) -> None:
    """Count the operations of an uncut run, then cut the power at every stride-th one."""
    probe = FaultyStorage(record=False)
    for step in (1, 2, 3):
        save(str(work / f"{label}-probe"), probe, step)
    for k in range(1, probe.calls + 1, stride):
        root = str(work / f"{label}-{k}")
        returned, cut = _run(root, save, Fault.power_cut(at=k), ignore_fsync=ignore_fsync)
        if not cut and ignore_fsync is False:
            continue  # an async save's operation count varies; k past the end cut nothing
        problem = _judge(root, returned, atomic=atomic, keep=None if atomic else KEEP)
        row.trial(None if problem is None else f"{label}, cut at operation {k}: {problem}")
    key = "ops_per_run" if label.startswith("control") else f"{label}_ops"
    row.figures[key] = probe.calls


def _random_sequences(work: Path, trials: int) -> Row:
    """Random savers, run lengths, retention and cut points (a seeded, repeatable mix)."""
    row = Row("power", "random save sequences cut at a random operation: saves returned lost = 0")
    rng = random.Random(20261128)  # noqa: S311 - a repeatable schedule, not a secret
    cuts = 0
    for i in range(trials):
        atomic = rng.random() < 0.3
        keep = None if atomic else rng.randint(1, 3)
        save = _atomic_saver if atomic else _manager_saver(async_save=False, keep=keep or 1)
        n = rng.randint(1, 5)
        k = rng.randint(1, 40 * n)
        root = str(work / f"random-{i}")
        returned, cut = _run(root, save, Fault.power_cut(at=k), steps=n)
        cuts += cut
        problem = _judge(root, returned, atomic=atomic, keep=keep)
        label = f"{'atomic' if atomic else f'save keep_last={keep}'}, {n} saves, cut at {k}"
        row.trial(None if problem is None else f"{label}: {problem}")
    row.figures.update({"seed": 20261128, "power_cuts": cuts})
    return row


def run(full: bool, work: Path) -> list[Row]:
    stride = 1 if full else 4
    claim = Row("power", CLAIM)
    savers: list[tuple[str, Callable[[str, FaultyStorage, int], None], bool]] = [
        ("save", _manager_saver(async_save=False), False),
        ("atomic", _atomic_saver, True),
    ]
    if full:
        savers.append(("async", _manager_saver(async_save=True), False))
    for label, save, atomic in savers:
        _sweep(claim, work, label, save, atomic=atomic, stride=stride)

    steps = Row("power", "power cut at every named protocol step: saves returned lost = 0")
    for step in PROTOCOL_STEPS:
        if step.startswith(("remote.", "deferred.", "reuse.")):
            # object stores; framework saves (tests/integrations/test_async_frameworks.py);
            # links of incremental saves (this state has no module: the gauntlet's
            # "incremental" scenario cuts the power there)
            continue
        for label, save, atomic in savers[: 2 if full else 1]:
            root = str(work / f"step-{label}-{step}")
            returned, cut = _run(root, save, None, step_cut=step)
            if not cut:
                if step in {"commit.quarantined", "commit.moved_to_trash"}:
                    continue  # reached only when a name is taken or replaced
                steps.trial(f"{label}: step {step} was never reached")
                continue
            problem = _judge(root, returned, atomic=atomic, keep=None if atomic else KEEP)
            steps.trial(None if problem is None else f"{label}, cut at {step}: {problem}")

    rows = [claim, steps, _random_sequences(work, 1000 if full else 20)]
    # Controls: each fsync the claim rests on, skipped, must lose a save that returned.
    for what, skip in CONTROLS:
        control = Row("power", f"{CLAIM}, with {what} skipped", control=True)
        label = f"control-{len(rows)}"
        _sweep(
            control,
            work,
            label,
            _manager_saver(async_save=False),
            atomic=False,
            stride=stride * 2,
            ignore_fsync=skip(work / label),
        )
        rows.append(control)
    return rows
