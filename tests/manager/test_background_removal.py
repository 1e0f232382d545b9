"""Retention's removal of retired checkpoints runs off the save's path (issue 18).

A save renames each checkpoint that retention retires into trash, under the root's lock,
and returns; a background thread fsyncs the root and removes the trash entry. These
tests show that:

- ``save`` returns while the removal is still blocked, with the retired name gone from
  the root and from ``list()``; ``wait`` and ``close`` return only once it is off the
  disk (control: with the removal inline, the same save cannot return);
- a SIGKILL in the middle of the background removal (strace kills the process at the
  second ``unlinkat`` of the removal) leaves every kept checkpoint valid, and the next
  start removes the half-removed trash entry (control: a checkpoint deleted in place,
  cut the same way, is left half-deleted under its name, and the check catches it).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import ckptguard
from ckptguard._format.layout import RETIRED_SUFFIX, RootLayout
from ckptguard._storage.local import LocalStorage

GUARD = 60.0  # a deadlock guard, not a timing: the events below order everything


def _state(step: int) -> dict[str, Any]:
    rng = np.random.default_rng(step)
    return {
        "model": {"w": rng.standard_normal(4096).astype(np.float32), "b": np.full(7, step)},
        "optim": {"m": rng.standard_normal(1024).astype(np.float32)},
        "step": step,
    }


class GatedRemoval(LocalStorage):
    """Local storage whose removal of a retired trash entry waits for ``release``."""

    def __init__(self) -> None:
        super().__init__()
        self.entered = threading.Event()
        self.release = threading.Event()

    def remove_tree(self, path: str) -> None:
        if path.endswith(RETIRED_SUFFIX):
            self.entered.set()
            if not self.release.wait(GUARD):
                raise TimeoutError("the test never released the removal")
        super().remove_tree(path)


def _trash(root: Path) -> list[str]:
    return sorted(os.listdir(RootLayout(str(root)).trash))


def test_save_returns_before_the_retired_checkpoint_is_removed(tmp_path: Path) -> None:
    storage = GatedRemoval()
    mgr = ckptguard.CheckpointManager(
        tmp_path, keep_last=1, storage=storage, check_environment=False
    )
    mgr.save(1, _state(1))
    returned = threading.Event()
    errors: list[BaseException] = []

    def second() -> None:
        try:
            mgr.save(2, _state(2))
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)
        returned.set()

    saver = threading.Thread(target=second)
    saver.start()
    try:
        assert storage.entered.wait(GUARD), "retention never started removing checkpoint-1"
        # The removal is blocked, and the save has returned all the same.
        assert returned.wait(GUARD), "save(2) did not return while checkpoint-1 was removed"
        assert errors == []
        assert [i.step for i in mgr.list()] == [2]
        assert not (tmp_path / "checkpoint-1").exists()
        (held,) = _trash(tmp_path)
        assert held.startswith("checkpoint-1.")
        assert held.endswith(RETIRED_SUFFIX)
    finally:
        storage.release.set()
        saver.join(GUARD)
    mgr.wait()  # waits for the removal
    assert _trash(tmp_path) == []
    assert mgr.restore()["step"] == 2
    mgr.close()


def test_close_and_wait_leave_no_retired_checkpoint_on_disk(tmp_path: Path) -> None:
    for async_save in (False, True):
        root = tmp_path / f"async-{async_save}"
        mgr = ckptguard.CheckpointManager(
            root, keep_last=2, async_save=async_save, check_environment=False
        )
        for step in range(1, 6):
            mgr.save(step, _state(step))
        mgr.wait()
        assert _trash(root) == []
        mgr.save(6, _state(6))
        mgr.close()
        assert _trash(root) == []
        assert sorted(p.name for p in root.glob("checkpoint-*")) == [
            "checkpoint-5",
            "checkpoint-6",
        ]
        again = ckptguard.CheckpointManager(root, keep_last=2, check_environment=False)
        assert again.latest() is not None
        assert again.restore()["step"] == 6
        again.close()


CHILD = """\
import os, shutil, sys
import numpy as np
import ckptguard

def state(step):
    rng = np.random.default_rng(step)
    return {
        "model": {"w": rng.standard_normal(4096).astype(np.float32), "b": np.full(7, step)},
        "optim": {"m": rng.standard_normal(1024).astype(np.float32)},
        "step": step,
    }

root, mode = sys.argv[1], sys.argv[2]
keep = 2 if mode == "ckptguard" else None
mgr = ckptguard.CheckpointManager(root, keep_last=keep, check_environment=False)
for step in (1, 2, 3):
    mgr.save(step, state(step))  # with keep_last=2, the third retires checkpoint-1
if mode == "control":  # what a saver without trash does: delete in place
    shutil.rmtree(os.path.join(root, "checkpoint-1"))
mgr.wait()
print("not killed")
"""


def _run_killed(tmp_path: Path, mode: str) -> tuple[Path, str]:
    """The child, killed by strace at the second unlinkat; the root and strace's log."""
    strace = shutil.which("strace")
    if strace is None:
        pytest.fail("strace is required (apt-get install strace)")
    root = tmp_path / mode
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    log = tmp_path / f"strace-{mode}.log"
    proc = subprocess.run(
        [
            strace, "-f", "-y", "-o", str(log), "-e", "trace=unlinkat",
            "-e", "inject=unlinkat:signal=KILL:when=2",
            sys.executable, str(script), str(root), mode,
        ],
        capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    assert "not killed" not in proc.stdout, proc.stdout + proc.stderr
    return root, log.read_text()


def _problems(root: Path) -> list[str]:
    """What a fresh start finds wrong: kept checkpoints that do not verify, trash left."""
    problems: list[str] = []
    mgr = ckptguard.CheckpointManager(root, keep_last=2, check_environment=False)
    try:
        problems.extend(
            f"{path.name} does not verify: {report.problems}"
            for path in sorted(root.glob("checkpoint-*"))
            if not (report := ckptguard.verify(path)).ok
        )
        latest = mgr.latest()
        if latest is None or latest.step != 3:
            problems.append(f"latest is {latest}, not checkpoint-3")
        elif mgr.restore()["step"] != 3:
            problems.append("checkpoint-3 does not restore")
        problems.extend(
            f"checkpoint-{step} (kept) does not verify"
            for step in (2, 3)
            if not ckptguard.verify(root / f"checkpoint-{step}").ok
        )
        left = _trash(root)
        if left:
            problems.append(f"trash left after a start: {left}")
    finally:
        mgr.close()
    return problems


def test_sigkill_during_background_removal_keeps_every_kept_checkpoint(tmp_path: Path) -> None:
    root, log = _run_killed(tmp_path, "ckptguard")
    calls = [line for line in log.splitlines() if "unlinkat(" in line]
    # The kill hit the removal of the retired checkpoint inside trash (strace -y names the
    # directory of each call): the point was reached.
    assert calls, log[-2000:]
    assert all(".ckptguard/trash/checkpoint-1." in line for line in calls), calls
    # The killed call never returned: strace ends its line with "= ?", or leaves it
    # "<unfinished ...>" when another thread's call was printed in between.
    assert calls[-1].endswith(("= ?", "<unfinished ...>")), calls
    assert "killed by SIGKILL" in log, log[-2000:]
    (held,) = _trash(root)  # cut mid-removal
    assert held.startswith("checkpoint-1."), held
    assert not (root / "checkpoint-1").exists()
    assert _problems(root) == []
    assert sorted(p.name for p in root.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-3"]


def test_control_in_place_deletion_cut_by_sigkill_is_caught(tmp_path: Path) -> None:
    root, _log = _run_killed(tmp_path, "control")
    problems = _problems(root)
    assert any("checkpoint-1 does not verify" in p for p in problems), problems
