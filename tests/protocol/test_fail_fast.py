"""A rank that fails inside a framework's save must end the job, not wait forever.

``CheckpointManager.save_files`` runs a framework's own save on every rank; that save has
its own collectives (Trainer's ``dist.barrier``, FSDP gathers). When rank 1 raises while
rank 0 waits in such a collective, rank 1 must raise at once (the launcher then ends the
job), instead of waiting for rank 0 in ckptguard's exchange while rank 0 waits for rank 1
in the framework's: a deadlock until a timeout. The control turns fail-fast off and
shows the deadlock (bounded here by the store's timeout).
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

CHILD = """
import sys
from datetime import timedelta
import torch.distributed as dist
import ckptguard
dist.init_process_group("gloo", timeout=timedelta(seconds=15))
fail_fast = sys.argv[2] == "on"
mgr = ckptguard.CheckpointManager(sys.argv[1], keep_last=None)
original = ckptguard._protocol.transaction.AtomicCheckpoint.__enter__

def enter(self):
    staging = original(self)
    self.fail_fast = fail_fast  # the control turns it off
    return staging

ckptguard._protocol.transaction.AtomicCheckpoint.__enter__ = enter

def write(tx):
    if dist.get_rank() == 1:
        raise RuntimeError("rank 1 cannot write its shard")
    (tx.staging_dir / "weights.bin").write_bytes(b"x")
    dist.barrier()  # the framework's own collective: rank 1 never arrives

mgr.save_files(1, write)
"""


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _run(tmp_path: Path, mode: str) -> subprocess.CompletedProcess[str]:
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    return subprocess.run(
        [
            sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
            "--master_addr=127.0.0.1", f"--master_port={_free_port()}",
            str(script), str(tmp_path / "root"), mode,
        ],
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
        env={**os.environ, "PYTHONWARNINGS": "ignore"},
    )  # fmt: skip


@pytest.mark.parametrize("mode", ["on", "off"], ids=["fail-fast", "control"])
def test_a_failing_rank_ends_the_job_instead_of_deadlocking(tmp_path: Path, mode: str) -> None:
    proc = _run(tmp_path, mode)
    assert proc.returncode != 0
    assert "rank 1 cannot write its shard" in proc.stderr
    timed_out = "timed out" in proc.stderr.lower() or "timeout" in proc.stderr.lower()
    if mode == "on":
        # Rank 1's own error ended the job: no rank waited out a timeout.
        assert not timed_out, proc.stderr[-3000:]
    else:
        # Without fail-fast the ranks wait for each other until the 15 s timeout.
        assert timed_out, proc.stderr[-3000:]
    assert not (tmp_path / "root" / "checkpoint-1").exists()
