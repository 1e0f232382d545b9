"""Saves on preemption in a plain loop: ``CheckpointManager(preemption=...)``.

Real processes (``preempt_loop.py``, one process or two gloo ranks under torchrun): a
rank sends itself the signal just before a step boundary; every rank must see
``preemption_requested`` at that step, save it once (committed, verified), exit with
``PREEMPTED_EXIT_CODE``, and the resumed run must end bit-identical to an uninterrupted
one. The control removes the agreement (each rank acts on its own signal): the signalled
rank's save then pairs with the other rank's next regular save, no checkpoint of the
signalled step exists, and the other rank never exits with the code.

In-process: the option's values, and the refusals (a handler of the program's own, a
thread other than the main one).
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import pytest
import torch

import ckptguard
from ckptguard._manager import preemption

LOOP = Path(__file__).with_name("preempt_loop.py")
ENV = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}
TIMEOUT = 120
LINE = "preempted by {sig} at step {step}: committed {path}; exiting with code 75"


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _run(out: Path, nproc: int, *args: str) -> subprocess.CompletedProcess[str]:
    launcher = [sys.executable]
    if nproc > 1:
        launcher += [
            "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
            "--master_addr=127.0.0.1", f"--master_port={_free_port()}",
        ]  # fmt: skip
    proc = subprocess.Popen(
        [*launcher, str(LOOP), str(out), *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=ENV,
        start_new_session=True,
    )
    try:
        stdout, stderr = proc.communicate(timeout=TIMEOUT)
    finally:
        if proc.poll() is None:  # hung: end it with its torchrun workers
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
    return subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)


def _expected_w(steps: int) -> bytes:
    """The loop's state after ``steps`` uninterrupted steps (same ops, same dtype)."""
    w = torch.zeros(1000, dtype=torch.float64)
    for step in range(1, steps + 1):
        w.mul_(0.99).add_(step)
    return w.numpy().tobytes()


def _checkpoints(out: Path) -> dict[str, bool]:
    return {p.name: ckptguard.verify(p).ok for p in sorted(out.glob("checkpoint-*"))}


def _exit_codes(stderr: str) -> list[int]:
    """The workers' exit codes in torchrun's failure report."""
    return [int(c) for c in re.findall(r"^\s*exitcode\s+:\s*(-?\d+)", stderr, re.MULTILINE)]


@pytest.mark.parametrize("nproc", [1, 2])
def test_a_signal_to_one_rank_saves_that_step_on_every_rank_and_resumes_exactly(
    tmp_path: Path, nproc: int
) -> None:
    out = tmp_path / "run"
    signalled = nproc - 1  # the last rank: not the committer
    first = _run(out, nproc, "--signal-at", "6", "--signal-rank", str(signalled))
    path = out / "checkpoint-6"
    if nproc == 1:
        assert first.returncode == ckptguard.PREEMPTED_EXIT_CODE, first.stderr[-4000:]
    else:  # torchrun fails the job and reports each worker's code
        assert first.returncode != 0
        assert sorted(_exit_codes(first.stderr)) == [75, 75], first.stderr[-4000:]
    assert f"rank{signalled}: " + LINE.format(sig="SIGTERM", step=6, path=path) in first.stderr
    if nproc == 2:
        peer = LINE.format(sig="a peer's signal", step=6, path=path)
        assert f"rank0: {peer}" in first.stderr, first.stderr[-4000:]
    assert _checkpoints(out) == {"checkpoint-4": True, "checkpoint-6": True}
    assert not (out / "final.json").exists()

    resumed = _run(out, nproc)
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    assert "resumed from step 6" in resumed.stdout
    final = json.loads((out / "final.json").read_text())
    assert final["step"] == 12
    assert bytes.fromhex(final["w"]) == _expected_w(12)  # nothing lost before step 6


def test_with_async_saves_the_signal_no_longer_ends_the_process_after_the_save(
    tmp_path: Path,
) -> None:
    """saver.py's SIGTERM handler (finish the in-flight save, die) is not installed."""
    out = tmp_path / "run"
    first = _run(out, 1, "--signal-at", "6", "--async")
    assert first.returncode == ckptguard.PREEMPTED_EXIT_CODE, first.stderr[-4000:]
    assert LINE.format(sig="SIGTERM", step=6, path=out / "checkpoint-6") in first.stderr
    assert _checkpoints(out) == {"checkpoint-4": True, "checkpoint-6": True}


def test_control_without_agreement_the_signalled_step_is_never_saved(tmp_path: Path) -> None:
    """Each rank acting on its own signal: the commit pairs different steps' saves."""
    out = tmp_path / "run"
    done = _run(out, 2, "--signal-at", "6", "--signal-rank", "1", "--local-only", "--grace", "2")
    assert done.returncode != 0
    assert "checkpoint-6" not in _checkpoints(out)  # the step the signalled rank saved
    assert "rank1: " + LINE.format(sig="SIGTERM", step=None, path="no checkpoint") in (
        done.stderr.replace("no checkpoint of that step", "no checkpoint")
    ), done.stderr[-4000:]
    assert sorted(_exit_codes(done.stderr)) != [75, 75]  # rank 0 never got to exit with it


def test_with_preemption_off_sigterm_ends_the_process_as_before(tmp_path: Path) -> None:
    out = tmp_path / "run"
    done = _run(out, 1, "--signal-at", "6", "--off")
    assert done.returncode == -signal.SIGTERM, done.stderr[-4000:]
    assert _checkpoints(out) == {"checkpoint-4": True}


def test_a_loop_that_misses_the_grace_period_finishes_the_async_save_and_dies_of_it(
    tmp_path: Path,
) -> None:
    out = tmp_path / "run"
    done = _run(out, 1, "--signal-at", "6", "--stuck", "--grace", "1")
    assert done.returncode == -signal.SIGTERM, done.stderr[-4000:]
    assert "SIGTERM: the training loop reached no step boundary within 1 s" in done.stderr
    assert _checkpoints(out) == {"checkpoint-4": True, "checkpoint-6": True}


# -- in-process: the option and its refusals --------------------------------------------------


def test_preemption_values() -> None:
    assert preemption.policy_of(False) is None
    assert preemption.policy_of(True) == ckptguard.Preemption()
    assert preemption.policy_of("USR1").signals == (signal.SIGUSR1,)  # type: ignore[union-attr]
    both = preemption.policy_of(["SIGTERM", int(signal.SIGUSR1)])
    assert both is not None
    assert both.signals == (signal.SIGTERM, signal.SIGUSR1)
    with pytest.raises(ValueError, match="unknown signal"):
        preemption.policy_of("SIGNOPE")
    with pytest.raises(ValueError, match="check_every"):
        ckptguard.Preemption(check_every=0)
    with pytest.raises(TypeError, match="preemption must be"):
        preemption.policy_of(1.5)


def test_preemption_requested_without_preemption_says_how_to_turn_it_on(tmp_path: Path) -> None:
    with (
        ckptguard.CheckpointManager(tmp_path) as mgr,
        pytest.raises(ValueError, match="preemption=True"),
    ):
        mgr.preemption_requested(1)


def test_a_program_handler_of_its_own_is_never_replaced(tmp_path: Path) -> None:
    def mine(signum: int, frame: Any) -> None:
        del signum, frame

    previous = signal.signal(signal.SIGUSR2, mine)
    try:
        with pytest.raises(RuntimeError, match="already handles SIGUSR2"):
            ckptguard.CheckpointManager(tmp_path, preemption="SIGUSR2")
        assert signal.getsignal(signal.SIGUSR2) is mine
        # The root is not left locked by the refused manager.
        with ckptguard.CheckpointManager(tmp_path) as mgr:
            mgr.save(1, {"x": 1})
    finally:
        signal.signal(signal.SIGUSR2, previous)


def test_only_the_main_thread_can_install_the_handler(tmp_path: Path) -> None:
    errors: list[BaseException] = []

    def make() -> None:
        try:
            ckptguard.CheckpointManager(tmp_path, preemption="SIGUSR2")
        except RuntimeError as exc:
            errors.append(exc)

    thread = threading.Thread(target=make)
    thread.start()
    thread.join()
    assert len(errors) == 1
    assert "main thread" in str(errors[0])
    assert signal.getsignal(signal.SIGUSR2) is signal.SIG_DFL


def test_close_restores_the_default_action(tmp_path: Path) -> None:
    with ckptguard.CheckpointManager(tmp_path, preemption="SIGUSR2") as mgr:
        assert signal.getsignal(signal.SIGUSR2) is not signal.SIG_DFL
        assert mgr.preemption_requested(1) is False  # nothing received: no request
    assert signal.getsignal(signal.SIGUSR2) is signal.SIG_DFL
