"""Transient and persistent storage errors, injected into every operation of real saves.

``ckptguard.testing.FaultyStorage`` raises EBUSY, ESTALE or EAGAIN (chosen at random) on
each storage operation with probability p, or an errno on every call of one operation
from some point on. Rows:

- p <= 0.05: 100% of saves succeed, and each restores exactly;
- p = 0.1 and 0.2: every save succeeds or raises a typed StorageError; earlier
  checkpoints intact, no staging left (the success rate is a figure);
- persistent EIO, EROFS or EDQUOT on each operation a save makes: the save raises the
  typed error of that errno (StorageError, ReadOnlyStorage, StorageFull), earlier
  checkpoints verify and restore, no staging is left once the next manager starts;
- control: the same p = 0.05 with retries off must fail saves.
"""

from __future__ import annotations

import errno
import logging
import os
from typing import TYPE_CHECKING, Any

import numpy as np

import ckptguard
from ckptguard._errors import ReadOnlyStorage, StorageError, StorageFull
from ckptguard._format.layout import RootLayout
from ckptguard._storage.retry import RetryPolicy
from ckptguard.testing import OPERATIONS, Fault, FaultyStorage
from gauntlet import Row

if TYPE_CHECKING:
    from pathlib import Path

TRANSIENT = (errno.EBUSY, errno.ESTALE, errno.EAGAIN)
PERSISTENT: dict[int, type[StorageError]] = {
    errno.EIO: StorageError,
    errno.EROFS: ReadOnlyStorage,
    errno.EDQUOT: StorageFull,
}
# Short waits: the faults are injected, not a real server that needs time to recover.
FAST = RetryPolicy(deadline=10.0, initial_wait=0.001, max_wait=0.02)
NO_RETRY = RetryPolicy(deadline=0.0, initial_wait=0.0, max_wait=0.0)


def _state(step: int) -> dict[str, Any]:
    rng = np.random.default_rng(step)
    return {"w": rng.standard_normal(300).astype(np.float32), "opt": {"m": np.full(7, step)}}


def _restores(mgr: ckptguard.CheckpointManager, step: int) -> bool:
    got = mgr.restore(step)
    want = _state(step)
    return bool(
        np.array_equal(got["w"], want["w"]) and np.array_equal(got["opt"]["m"], want["opt"]["m"])
    )


def _staging_left(root: str) -> list[str]:
    staging = RootLayout(root).staging
    return sorted(os.listdir(staging)) if os.path.isdir(staging) else []


def _flaky_saves(
    row: Row, work: Path, p: float, saves: int, *, policy: RetryPolicy, must_succeed: bool
) -> None:
    """``saves`` saves at fault probability ``p``; each one is a trial of the row's claim."""
    root = str(work / f"flaky-{p}-{policy.deadline}")
    first = ckptguard.CheckpointManager(root, keep_last=3, check_environment=False)
    first.save(0, _state(0))  # a good checkpoint to keep intact (pinned: never retired)
    first.pin(0)
    first.close()
    ok = 0
    storage = FaultyStorage(seed=int(p * 1000), record=False)
    mgr = ckptguard.CheckpointManager(
        root, keep_last=3, storage=storage, retry=policy, check_environment=False
    )
    for step in range(1, saves + 1):
        problem = None
        storage.add(Fault.flaky(TRANSIENT, p))  # faults during the save only
        try:
            mgr.save(step, _state(step))
            ok += 1
        except StorageError as exc:
            if must_succeed:
                problem = f"p={p}: save {step} failed: {exc}"
        except Exception as exc:
            problem = f"p={p}: save {step} raised {type(exc).__name__} (untyped): {exc}"
        finally:
            storage.clear()
        if problem is None and step in {i.step for i in mgr.list()} and not _restores(mgr, step):
            problem = f"p={p}: checkpoint-{step} does not restore to what was saved"
        if problem is None and not _restores(mgr, 0):
            problem = f"p={p}: the earlier checkpoint-0 no longer restores"
        if problem is None and _staging_left(root):
            problem = f"p={p}: staging left after save {step}: {_staging_left(root)}"
        row.trial(problem)
    mgr.close()
    row.figures[f"ok_at_p{p}"] = f"{100 * ok / saves:.0f}%"


def _persistent(row: Row, work: Path, ops: list[str]) -> None:
    for op in ops:
        for code, kind in PERSISTENT.items():
            root = str(work / f"persistent-{op}-{code}")
            good = ckptguard.CheckpointManager(root, keep_last=5, check_environment=False)
            good.save(1, _state(1))
            good.close()
            storage = FaultyStorage(record=False)
            mgr = ckptguard.CheckpointManager(
                root, keep_last=5, storage=storage, retry=FAST, check_environment=False
            )
            storage.add(Fault.fail(op, code, times=None))  # from the save's first call on
            name = f"{op} {errno.errorcode[code]}"
            problem = None
            try:
                mgr.save(2, _state(2))  # a failure after the commit may be logged only
                storage.clear()
                if not _restores(mgr, 2):
                    problem = f"{name}: the save returned but checkpoint-2 does not restore"
            except kind:
                pass
            except Exception as exc:
                problem = f"{name}: raised {type(exc).__name__}, not {kind.__name__}: {exc}"
            finally:
                storage.clear()
                mgr.close()
            if problem is None and not storage.fired:
                continue  # this operation is not part of a save after its start
            after = ckptguard.CheckpointManager(root, keep_last=5, check_environment=False)
            try:
                if problem is None and not _restores(after, 1):
                    problem = f"{name}: the earlier checkpoint-1 no longer restores"
                if problem is None and _staging_left(root):
                    problem = f"{name}: staging left after the next start: {_staging_left(root)}"
            finally:
                after.close()
            row.trial(problem)


def _save_ops(work: Path) -> list[str]:
    """The operations a save makes after the manager started, in first-call order."""
    root = str(work / "ops")
    storage = FaultyStorage()
    mgr = ckptguard.CheckpointManager(root, keep_last=1, storage=storage, check_environment=False)
    mgr.save(1, _state(1))
    start = storage.calls
    mgr.save(2, _state(2))  # the second save also retires the first
    mgr.close()
    seen = dict.fromkeys(op for op, _ in storage.log[start:])
    assert set(seen) <= set(OPERATIONS)
    return list(seen)


def run(full: bool, work: Path) -> list[Row]:
    logging.getLogger("ckptguard").setLevel(logging.ERROR)  # retries log a warning each
    saves = 200 if full else 15
    low = Row("transient", "transient EBUSY/ESTALE/EAGAIN at p <= 0.05: 100% of saves succeed")
    for p in (0.01, 0.02, 0.05):
        _flaky_saves(low, work, p, saves, policy=FAST, must_succeed=True)
    high = Row(
        "transient",
        "at p = 0.1, 0.2: a save succeeds or raises a typed error; no staging left",
    )
    for p in (0.1, 0.2):
        _flaky_saves(high, work, p, saves // 2, policy=FAST, must_succeed=False)
    persistent = Row(
        "transient",
        "persistent EIO/EROFS/EDQUOT on each operation of a save: typed error, earlier "
        "checkpoints intact, staging cleaned",
    )
    ops = _save_ops(work)
    _persistent(persistent, work, ops)
    persistent.figures["operations"] = len(ops)
    control = Row("transient", low.claim + " (retries off)", control=True)
    _flaky_saves(control, work, 0.05, saves, policy=NO_RETRY, must_succeed=True)
    return [low, high, persistent, control]
