"""Async saves: ``CheckpointManager(async_save=True)`` and ``save(..., blocking=False)``.

The training thread only copies tensors into reused staging buffers; writing, checksums,
fsync, commit and retention run in a background thread. These tests hold the background
thread at a protocol step (a fault hook that waits on an event) to make every ordering
deterministic, and run real child processes for exit and SIGTERM.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

import ckptguard
from ckptguard._format.layout import RootLayout
from ckptguard._manager.manager import PendingSave
from ckptguard._state.serialization import StagingBuffers, encode_state
from ckptguard._storage import faults as _faults

CHILD_ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


class Gate:
    """Holds the background thread at fault point ``point`` until ``release()``."""

    def __init__(self, point: str = "stage.created") -> None:
        self.point = point
        self.reached = threading.Event()
        self.go = threading.Event()
        self.fail: BaseException | None = None

    def hook(self, name: str) -> None:
        if name != self.point or threading.current_thread() is threading.main_thread():
            return
        self.reached.set()
        if not self.go.wait(60):
            raise RuntimeError("gate never released")
        if self.fail is not None:
            raise self.fail

    def release(self) -> None:
        self.go.set()


@pytest.fixture
def gate() -> Iterator[Gate]:
    g = Gate()
    previous = _faults.set_fault_hook(g.hook)
    try:
        yield g
    finally:
        g.release()
        _faults.set_fault_hook(previous)


def _state(step: int) -> dict[str, Any]:
    torch.manual_seed(step)
    return {
        "model": {"w": torch.randn(64, 32), "b": torch.randn(32), "half": torch.randn(8).half()},
        "t": torch.randn(6, 4).t(),  # non-contiguous
        "np": np.arange(12, dtype=np.float32).reshape(3, 4) * step,
        "step": step,
        "name": f"step-{step}",
    }


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, np.ndarray):
        return isinstance(b, np.ndarray) and a.dtype == b.dtype and np.array_equal(a, b)
    return bool(a == b)


def test_async_save_commits_what_the_state_was_when_save_returned(
    tmp_path: Path, gate: Gate
) -> None:
    mgr = ckptguard.CheckpointManager(tmp_path / "run", async_save=True)
    state = _state(1)
    expected = {
        "model": {k: v.clone() for k, v in state["model"].items()},
        "t": state["t"].clone(),
        "np": state["np"].copy(),
        "step": 1,
        "name": "step-1",
    }
    job = mgr.save(1, state)
    assert isinstance(job, PendingSave)
    assert gate.reached.wait(30)  # the background thread holds before writing anything
    assert not job.done()
    # The training thread changes every tensor in place before a byte is written.
    for v in state["model"].values():
        v.zero_()
    state["t"].fill_(7.0)
    state["np"][:] = -1
    gate.release()
    info = job.result(timeout=60)
    assert info.valid
    assert info.step == 1
    assert _same(mgr.restore(1), expected)
    mgr.close()


def test_control_without_the_snapshot_the_change_is_saved(
    tmp_path: Path, gate: Gate, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The test above can fail: with a snapshot that only references the tensors, the
    changes made after ``save`` returned end up in the checkpoint."""
    monkeypatch.setattr(StagingBuffers, "snapshot", lambda _self, encoded: encoded)
    mgr = ckptguard.CheckpointManager(tmp_path / "run", async_save=True)
    state = _state(1)
    job = mgr.save(1, state)
    assert gate.reached.wait(30)
    state["model"]["w"].zero_()
    gate.release()
    job.result(timeout=60)
    assert bool(torch.all(mgr.restore(1)["model"]["w"] == 0))
    mgr.close()


def test_blocking_false_on_a_sync_manager_and_blocking_true_on_an_async_one(
    tmp_path: Path,
) -> None:
    sync = ckptguard.CheckpointManager(tmp_path / "a")
    job = sync.save(1, _state(1), blocking=False)
    assert isinstance(job, PendingSave)
    assert job.result(60).valid
    asyn = ckptguard.CheckpointManager(tmp_path / "b", async_save=True)
    info = asyn.save(1, _state(1), blocking=True)
    assert isinstance(info, ckptguard.CheckpointInfo)
    assert info.valid
    assert asyn.wait() is None  # nothing in flight
    for m in (sync, asyn):
        m.close()


def test_at_most_one_save_in_flight(tmp_path: Path, gate: Gate) -> None:
    mgr = ckptguard.CheckpointManager(tmp_path / "run", async_save=True, keep_last=None)
    first = mgr.save(1, _state(1), blocking=False)
    assert gate.reached.wait(30)
    returned = threading.Event()
    box: list[PendingSave] = []

    def second() -> None:
        box.append(mgr.save(2, _state(2), blocking=False))
        returned.set()

    worker = threading.Thread(target=second)
    worker.start()
    # The second save waits for the first, which is held before writing.
    assert not returned.wait(1.0)
    assert not first.done()
    gate.release()
    assert returned.wait(60)
    worker.join()
    assert first.done()
    assert first.result().valid
    (job,) = box
    assert job.result(60).step == 2
    assert [i.step for i in mgr.list()] == [1, 2]
    mgr.close()


def test_background_failure_is_logged_at_once_and_raised_once_at_the_next_save(
    tmp_path: Path, gate: Gate, caplog: pytest.LogCaptureFixture
) -> None:
    gate.fail = OSError(5, "Input/output error (injected)")
    mgr = ckptguard.CheckpointManager(tmp_path / "run", async_save=True)
    with caplog.at_level(logging.ERROR, logger="ckptguard"):
        job = mgr.save(1, _state(1), blocking=False)
        gate.release()
        while not job.done():
            time.sleep(0.01)
        # logged by the background thread, before anyone asked
        assert any("async save of step 1" in r.getMessage() for r in caplog.records)
    with pytest.raises(OSError, match="injected"):
        mgr.save(2, _state(2))
    assert not (tmp_path / "run" / "checkpoint-1").exists()
    assert not (tmp_path / "run" / "checkpoint-2").exists()  # the failed save stopped it
    # raised once: the next save goes through (the gate fails only its own thread once)
    gate.fail = None
    assert mgr.save(2, _state(2), blocking=False).result(60).valid
    mgr.close()


@pytest.mark.parametrize("where", ["wait", "close", "result"])
def test_background_failure_raised_by_wait_close_or_result(
    tmp_path: Path, gate: Gate, where: str
) -> None:
    gate.fail = RuntimeError("disk went away (injected)")
    mgr = ckptguard.CheckpointManager(tmp_path / "run", async_save=True)
    job = mgr.save(1, _state(1))
    assert isinstance(job, PendingSave)
    gate.release()
    with pytest.raises(RuntimeError, match="injected"):
        if where == "wait":
            mgr.wait()
        elif where == "close":
            mgr.close()
        else:
            job.result(60)
    assert mgr.wait() is None  # raised once only
    mgr.close()
    assert list(Path(RootLayout(str(tmp_path / "run")).staging).iterdir()) == []


def test_context_manager_waits_for_the_last_save(tmp_path: Path) -> None:
    with ckptguard.CheckpointManager(tmp_path / "run", async_save=True) as mgr:
        mgr.save(1, _state(1))
        mgr.save(2, _state(2))
    assert ckptguard.verify(tmp_path / "run" / "checkpoint-2").ok


def test_staging_buffers_are_allocated_once_and_reused(tmp_path: Path) -> None:
    mgr = ckptguard.CheckpointManager(tmp_path / "run", async_save=True, keep_last=1)
    model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.Linear(64, 8))
    for step in range(1, 101):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(1.0)
        mgr.save(step, {"model": model.state_dict(), "step": step})
    last = mgr.wait()
    assert last is not None
    assert last.step == 100
    assert mgr.saver._buffers is not None
    assert mgr.saver._buffers.allocations == 1
    assert mgr.saver._buffers.capacity >= sum(p.numel() * 4 for p in model.parameters())
    restored = mgr.restore()
    assert restored["step"] == 100
    first = model[0]
    assert isinstance(first, torch.nn.Linear)
    assert torch.equal(restored["model"]["0.weight"], first.weight.detach())
    mgr.close()
    assert mgr.saver._buffers.capacity == 0  # close frees them


def test_snapshot_copies_every_dtype_and_layout() -> None:
    state = {
        "bf16": torch.randn(5, 3).to(torch.bfloat16),
        "fp8": torch.randn(16).to(torch.float8_e4m3fn),
        "c64": torch.randn(4, dtype=torch.complex64).conj(),  # a conjugate view
        "bool": torch.tensor([True, False, True]),
        "i64": torch.arange(7),
        "empty": torch.zeros(0, 3),
        "scalar": torch.tensor(3.5),
        "strided": torch.arange(24.0).reshape(4, 6)[:, ::2],
        "np": np.arange(5, dtype=np.int16),
        "np_t": np.arange(12.0).reshape(3, 4).T,
    }
    buffers = StagingBuffers()
    snap = buffers.snapshot(encode_state({"s": state}))
    sources = {p.name: p.source for g in snap.groups for p in g.tensors}
    for key, value in state.items():
        got = sources[key]
        if isinstance(value, torch.Tensor):
            expected = value.resolve_conj()
            assert (got.dtype, got.shape) == (expected.dtype, expected.shape), key
            raw = expected.contiguous().reshape(-1).view(torch.uint8)
            assert torch.equal(got.reshape(-1).view(torch.uint8), raw), key
            assert got.untyped_storage().data_ptr() != value.untyped_storage().data_ptr()
        else:
            assert isinstance(got, np.ndarray)
            assert isinstance(value, np.ndarray)
            assert got.dtype == value.dtype, key
            assert np.array_equal(got, value), key
            assert not np.shares_memory(got, value)


def test_sharded_saves_are_blocking(tmp_path: Path) -> None:
    mgr = ckptguard.CheckpointManager(tmp_path / "run", async_save=True)
    with pytest.raises(ValueError, match="blocking"):
        mgr.save(1, {"w": torch.zeros(2)}, sharded=True, blocking=False)


_EXIT_CHILD = textwrap.dedent(
    """
    import json, os, sys, time
    import torch
    import ckptguard
    from ckptguard._storage import faults as _faults

    root, mode = sys.argv[1], sys.argv[2]
    held = os.environ.get("HOLD_SECONDS")
    if held:
        def slow(name):  # a slow disk: the background thread takes a while
            if name == "stage.created" and step_now[0] == 2:
                time.sleep(float(held))
        _faults.set_fault_hook(slow)
    step_now = [0]
    mgr = ckptguard.CheckpointManager(
        root, async_save=True, exit_timeout=float(os.environ.get("EXIT_TIMEOUT", "120"))
    )
    for step in (1, 2):
        step_now[0] = step
        mgr.save(step, {"w": torch.full((1000,), float(step)), "step": step})
        if step == 1:
            mgr.wait()
    print("saving", flush=True)
    if mode == "sleep":
        time.sleep(60)  # SIGTERM arrives here
    # mode "exit": the script ends with the save still in flight
    """
)


def _exit_child(tmp_path: Path, mode: str, **env: str) -> subprocess.Popen[str]:
    script = tmp_path / "child.py"
    script.write_text(_EXIT_CHILD)
    return subprocess.Popen(
        [sys.executable, str(script), str(tmp_path / "run"), mode],
        env={**CHILD_ENV, **env},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def test_process_exit_finishes_the_in_flight_save(tmp_path: Path) -> None:
    proc = _exit_child(tmp_path, "exit", HOLD_SECONDS="2")
    _out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    assert "waiting up to" in err  # it said why exit took a moment
    report = ckptguard.verify(tmp_path / "run" / "checkpoint-2")
    assert report.ok, report.problems


def test_sigterm_finishes_the_in_flight_save_then_dies_of_sigterm(tmp_path: Path) -> None:
    proc = _exit_child(tmp_path, "sleep", HOLD_SECONDS="3")
    assert proc.stdout is not None
    assert proc.stdout.readline().strip() == "saving"
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == -signal.SIGTERM, err
    assert "SIGTERM: waiting up to" in err
    assert ckptguard.verify(tmp_path / "run" / "checkpoint-2").ok


_SIGTERM_IN_WAIT_CHILD = textwrap.dedent(
    """
    import os, signal, sys, threading, time
    import torch
    import ckptguard
    from ckptguard._storage import faults as _faults

    def slow(name):  # the save takes a while: the main thread waits in result()
        if name == "stage.created":
            time.sleep(1.0)
    _faults.set_fault_hook(slow)
    mgr = ckptguard.CheckpointManager(sys.argv[1], async_save=True, exit_timeout=60)
    job = mgr.save(1, {"w": torch.full((1000,), 1.0), "step": 1})
    wait_code = threading.Event.wait.__code__
    sent = []

    def trace(frame, event, arg):
        # SIGTERM exactly while this thread holds the Event's Condition lock, at the line
        # "signaled = self._flag" inside "with self._cond:": the issue's deadlock.
        if frame.f_code is wait_code and event == "line" and not sent:
            line = frame.f_code.co_filename and __import__("linecache").getline(
                frame.f_code.co_filename, frame.f_lineno)
            if "signaled = self._flag" in line:
                sent.append(1)
                os.kill(os.getpid(), signal.SIGTERM)
        return trace

    print("waiting", flush=True)
    sys.settrace(trace)
    job.result()
    sys.settrace(None)
    time.sleep(60)  # the watcher ends the process with SIGTERM well before this
    print("survived", flush=True)
    """
)


def test_sigterm_while_waiting_on_an_async_save_never_deadlocks(tmp_path: Path) -> None:
    """SIGTERM delivered while the main thread holds the lock of the Event it waits on.

    The handler once waited on that same Event and deadlocked (issue 15): the process hung
    until SIGKILL. Now it ends with SIGTERM once the save is committed.
    """
    script = tmp_path / "child.py"
    script.write_text(_SIGTERM_IN_WAIT_CHILD)
    proc = subprocess.Popen(
        [sys.executable, str(script), str(tmp_path / "run")],
        env=CHILD_ENV,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        out, err = proc.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        pytest.fail(f"the process hung after SIGTERM (deadlock): {err[-2000:]}")
    assert proc.returncode == -signal.SIGTERM, err[-2000:]
    assert "waiting" in out
    assert "survived" not in out
    assert ckptguard.verify(tmp_path / "run" / "checkpoint-1").ok


def test_control_exit_timeout_gives_up_and_nothing_half_written_is_visible(
    tmp_path: Path,
) -> None:
    """With no time to finish, the save is abandoned: the test above can fail, and an
    abandoned save leaves only a staging dir that the next start removes."""
    proc = _exit_child(tmp_path, "sleep", HOLD_SECONDS="30", EXIT_TIMEOUT="0.5")
    assert proc.stdout is not None
    assert proc.stdout.readline().strip() == "saving"
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == -signal.SIGTERM, err
    assert "gave up on the async save of step 2" in err
    root = tmp_path / "run"
    assert not (root / "checkpoint-2").exists()
    staging = Path(RootLayout(str(root)).staging)
    assert len(list(staging.iterdir())) == 1  # its leftovers, invisible to readers
    mgr = ckptguard.CheckpointManager(root, stale_after=0)
    info = mgr.latest()
    assert info is not None
    assert info.step == 1
    assert list(staging.iterdir()) == []  # startup recovery removed the dead save's dir


def test_sigterm_handler_is_not_installed_over_the_programs_own(tmp_path: Path) -> None:
    script = tmp_path / "own.py"
    script.write_text(
        textwrap.dedent(
            """
            import signal, sys, json, torch, ckptguard
            def mine(signum, frame):
                pass
            signal.signal(signal.SIGTERM, mine)
            mgr = ckptguard.CheckpointManager(sys.argv[1], async_save=True)
            mgr.save(1, {"w": torch.zeros(3)})
            mgr.close()
            print(json.dumps(signal.getsignal(signal.SIGTERM) is mine))
            """
        )
    )
    proc = subprocess.run(
        [sys.executable, str(script), str(tmp_path / "run")],
        env=CHILD_ENV,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout) is True
