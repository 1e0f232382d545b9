"""Readers of a live root: an evaluator restoring while a trainer saves and retains.

A checkpoint that another process's retention removes between the listing and the read
is skipped like a corrupt one, and the next newest valid one is taken; an explicit
``restore(step)`` of a removed checkpoint raises ``CheckpointNotFound``. No builtin error
escapes (issue 15: 12 of 2,000 restores raised a bare FileNotFoundError, 4 raised
CheckpointNotFound although a newer checkpoint existed).
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import torch

import ckptguard

CHILD_ENV = {**os.environ, "OMP_NUM_THREADS": "1", "CKPTGUARD_DOCTOR": "0"}
SAVES = 800

_SAVER = textwrap.dedent(
    """
    import sys, torch, ckptguard
    root, first, last = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    mgr = ckptguard.CheckpointManager(root, keep_last=1, check_environment=False)
    for step in range(first, last + 1):
        mgr.save(step, {"w": torch.full((4096,), float(step)), "step": step})
    print("done", flush=True)
    """
)


def _consistent(state: dict[str, object]) -> bool:
    w, step = state["w"], state["step"]
    return isinstance(w, torch.Tensor) and isinstance(step, int) and bool((w == step).all())


def test_an_evaluator_beside_a_keep_last_1_saver_always_reads_a_valid_checkpoint(
    tmp_path: Path,
) -> None:
    root = tmp_path / "run"
    first = ckptguard.CheckpointManager(root, keep_last=1, check_environment=False)
    first.save(0, {"w": torch.zeros(4096), "step": 0})  # something valid from the start
    first.close()
    script = tmp_path / "saver.py"
    script.write_text(_SAVER)
    saver = subprocess.Popen(
        [sys.executable, str(script), str(root), "1", str(SAVES)],
        env=CHILD_ENV,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    reader = ckptguard.CheckpointManager(root, keep_last=None, check_environment=False)
    builtin: list[str] = []  # errors outside ckptguard's tree: must stay empty
    restored = explicit = gone = 0
    steps: set[int] = set()
    try:
        while saver.poll() is None:
            try:
                state = reader.restore()
                assert _consistent(state), state["step"]
                steps.add(int(state["step"]))
                restored += 1
            except ckptguard.CheckpointError as exc:  # restore() must find the newest
                builtin.append(f"restore(): {type(exc).__name__}: {exc}")
            except Exception as exc:
                builtin.append(f"restore(): {type(exc).__name__}: {exc}")
            try:
                info = reader.latest()
                assert info is not None  # there is always a valid checkpoint
                state = reader.restore(info.step)
                assert _consistent(state)
                explicit += 1
            except ckptguard.CheckpointNotFound:
                gone += 1  # retired between latest() and restore(step): documented
            except Exception as exc:
                builtin.append(f"latest()+restore(step): {type(exc).__name__}: {exc}")
    finally:
        out, err = saver.communicate(timeout=300)
    assert saver.returncode == 0, err[-3000:]
    assert "done" in out
    assert builtin == [], builtin[:5]
    assert restored >= 20, restored  # the loop really raced the saver
    assert len(steps) >= 5, steps  # ... across many of its saves
    final = reader.restore()
    assert final["step"] == SAVES
    assert explicit + gone > 0
