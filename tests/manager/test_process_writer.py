"""async_writer="process": a separate process writes the tensor files of async saves.

Real processes and files throughout: the writer is a real child interpreter, killed with
real signals; a full disk is a real 1 MiB tmpfs in a mount namespace.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from ckptguard import CheckpointManager, UnsupportedRoot, WriterDied
from ckptguard._storage.local import LocalStorage

pytestmark = pytest.mark.skipif(
    not hasattr(os, "memfd_create"), reason="the writer process needs memfd_create (Linux)"
)


def _state(seed: int) -> dict[str, object]:
    gen = torch.Generator().manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(256, 256), torch.nn.Linear(256, 64))
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen))
    return {
        "model": model,
        "extra": {"half": torch.randn(300, generator=gen).to(torch.bfloat16), "n": 7},
        "flat": torch.arange(1000, dtype=torch.int64),
        "step": seed,
    }


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie (exited, not reaped yet) is not alive either
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except FileNotFoundError:
        return False


def _wait_gone(pid: int, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not _alive(pid):
            return True
        time.sleep(0.05)
    return False


def test_files_are_byte_identical_to_the_thread_writers_and_the_snapshot_is_isolated(
    tmp_path: Path,
) -> None:
    state = _state(1)
    expected = {k: v.clone() for k, v in state["model"].state_dict().items()}  # type: ignore[attr-defined]
    thread = CheckpointManager(tmp_path / "thread", async_save=True)
    proc = CheckpointManager(tmp_path / "proc", async_save=True, async_writer="process")
    try:
        for mgr in (thread, proc):
            pending = mgr.save(5, state)
            with torch.no_grad():  # the next training step, at once
                for p in state["model"].parameters():  # type: ignore[attr-defined]
                    p.add_(1.0)
            pending.result()
            state["model"].load_state_dict(expected)  # type: ignore[attr-defined]
        writer = proc.saver.writer
        assert writer is not None
        assert writer.pid is not None
        assert writer.pid != os.getpid()
        assert _alive(writer.pid)
        for name in ("model.safetensors", "extra.safetensors", "tensors.safetensors"):
            a = (tmp_path / "thread" / "checkpoint-5" / name).read_bytes()
            b = (tmp_path / "proc" / "checkpoint-5" / name).read_bytes()
            assert a == b, name
        assert proc.verify(5).ok
        target = _state(2)
        proc.restore(5, target)
        for key, value in target["model"].state_dict().items():  # type: ignore[attr-defined]
            assert torch.equal(value, expected[key]), key
        # The writer process never imports torch: it maps no torch library.
        maps = Path(f"/proc/{writer.pid}/maps").read_text()
        assert "libtorch" not in maps
        pid = writer.pid
    finally:
        thread.close()
        proc.close()
    assert _wait_gone(pid), "close() leaves the writer process running"


def test_one_writer_process_serves_every_save_and_the_buffer_is_reused(tmp_path: Path) -> None:
    state = _state(3)
    with CheckpointManager(
        tmp_path / "run", keep_last=2, async_save=True, async_writer="process"
    ) as mgr:
        pids = set()
        for step in range(1, 5):
            mgr.save(step, state).result()
            assert mgr.saver.writer is not None
            pids.add(mgr.saver.writer.pid)
        assert len(pids) == 1
        assert mgr.saver.writer is not None
        assert mgr.saver.writer.starts == 1
        assert mgr.saver._buffers is not None
        assert mgr.saver._buffers.allocations == 1
        assert [c.step for c in mgr.list()] == [3, 4]
        # A blocking save in between is written by this process, as always.
        mgr.save(5, state, blocking=True)
        assert mgr.verify(5).ok


def test_a_writer_killed_mid_save_fails_that_save_only(tmp_path: Path) -> None:
    state = _state(4)
    root = tmp_path / "run"
    with CheckpointManager(root, async_save=True, async_writer="process") as mgr:
        mgr.save(1, state).result()
        writer = mgr.saver.writer
        assert writer is not None
        assert writer.pid is not None
        first = writer.pid
        # Stop the writer, hand it a save, then kill it: the save is in flight when it dies.
        os.kill(first, signal.SIGSTOP)
        pending = mgr.save(2, state)
        time.sleep(0.3)
        assert not pending.done()
        os.kill(first, signal.SIGKILL)
        with pytest.raises(WriterDied, match="signal 9"):
            pending.result(timeout=60)
        assert not (root / "checkpoint-2").exists()
        assert [p.name for p in (root / ".ckptguard").rglob("*checkpoint-2*")] == []
        # The next save starts a new writer and commits.
        mgr.save(3, state).result()
        assert writer.pid not in {None, first}
        assert writer.starts == 2
        assert [c.step for c in mgr.list()] == [1, 3]
        assert mgr.verify(3).ok


CHILD = r"""
import json, os, sys, torch, ckptguard
root, mode = sys.argv[1], sys.argv[2]
mgr = ckptguard.CheckpointManager(root, async_save=True, async_writer=mode)
state = {"w": torch.ones(1024, 1024)}  # 4 MiB
if mode == "process" and len(sys.argv) > 3:  # the crash case
    mgr.save(1, {"w": torch.ones(16)}).result()
    pending = mgr.save(2, state)
    print(json.dumps({"writer": mgr.saver.writer.pid}), flush=True)
    os.kill(os.getpid(), 9)
try:
    mgr.save(1, state).result()
    print(json.dumps({"error": None}))
except Exception as exc:
    print(json.dumps({"error": type(exc).__name__, "errno": getattr(exc, "errno", None)}))
"""


def _tool(name: str) -> str:
    path = shutil.which(name)
    assert path, f"{name} is required for this test (CI installs it)"
    return path


@pytest.mark.parametrize("writer", ["thread", "process"])
def test_a_full_disk_raises_the_same_typed_error_as_the_thread_writer(
    tmp_path: Path, writer: str
) -> None:
    child = tmp_path / "child.py"
    child.write_text(CHILD)
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    script = 'mount -t tmpfs -o size=1m tmpfs "$1" && "$2" "$3" "$1/run" "$4"'
    proc = None
    for prefix in (["-rm"], ["-m"]):
        cmd = [_tool("unshare"), *prefix, "sh", "-c", script, "sh", str(mnt)]
        proc = subprocess.run(
            [*cmd, sys.executable, str(child), writer],
            capture_output=True,
            text=True,
            check=False,
            timeout=120,
        )
        if proc.returncode == 0:
            break
    assert proc is not None
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result == {"error": "StorageFull", "errno": 28}, (result, proc.stderr)


def test_the_writer_exits_when_the_training_process_dies_mid_save(tmp_path: Path) -> None:
    child = tmp_path / "child.py"
    child.write_text(CHILD)
    root = tmp_path / "run"
    proc = subprocess.run(
        [sys.executable, str(child), str(root), "process", "crash"],
        capture_output=True,
        text=True,
        check=False,
        timeout=120,
    )
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    writer = json.loads(proc.stdout.strip().splitlines()[-1])["writer"]
    assert _wait_gone(writer), "the writer outlived the training process"
    with CheckpointManager(root) as mgr:  # start-up removes the dead save's staging
        assert [c.step for c in mgr.list()] == [1]
        assert mgr.verify(1).ok
    assert not (root / "checkpoint-2").exists()


def test_refused_where_it_cannot_write(tmp_path: Path) -> None:
    class Wrapped(LocalStorage):
        pass

    with pytest.raises(UnsupportedRoot, match="plain LocalStorage"):
        CheckpointManager(tmp_path / "a", async_writer="process", storage=Wrapped())
    with pytest.raises(ValueError, match="'thread' or 'process'"):
        CheckpointManager(tmp_path / "b", async_writer="processes")  # type: ignore[arg-type]
    assert not (tmp_path / "a").exists()
    assert not (tmp_path / "b").exists()
