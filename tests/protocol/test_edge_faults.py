"""Faults at the edges of a save: before anything is written, and after the commit.

- a full disk when the staging dir is created: a typed StorageFull, nothing left behind;
- EIO on the fsync of ROOT after the rename: an error that says the checkpoint is
  complete and visible but of unknown durability (never "aborted");
- a stale staging dir that cannot be removed: the save still succeeds (cleanup after a
  durable commit never fails the save), and recover() removes it later.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

CHILD = """
import json, logging, os, sys
from pathlib import Path
import ckptguard
from ckptguard._protocol.cleanup import write_owner
from ckptguard._protocol.rename import stage
from ckptguard._format.owner import current_writer
import dataclasses

mode, root = sys.argv[1], Path(sys.argv[2])
out = {"pid": os.getpid()}
if mode == "fill":  # fill the filesystem, then try to save
    try:
        with open(root.parent / "filler", "wb") as f:
            while True:
                f.write(b"\\0" * 65536)
    except OSError:
        pass
if mode == "stale":  # a stale staging dir left by a dead process
    dead = dataclasses.replace(current_writer(), pid=int(sys.argv[3]), pid_start=1)
    s = stage(root, "checkpoint-0", writer=dead)
    Path(s.path, "leftover.bin").write_bytes(b"x")
    out["stale"] = s.path
tx = ckptguard.atomic_checkpoint(root / "checkpoint-1")
try:
    with tx as d:
        (d / "w.bin").write_bytes(b"w" * 1000)
    out["outcome"] = tx.result.outcome.value
except Exception as exc:
    out["error"] = type(exc).__name__
    out["message"] = str(exc)
staging = root / ".ckptguard" / "staging"
out["staging"] = sorted(os.listdir(staging)) if staging.exists() else []
out["verifies"] = ckptguard.verify(root / "checkpoint-1").ok
print(json.dumps(out))
"""


def _tool(name: str) -> str:
    path = shutil.which(name)
    assert path, f"{name} is required for this test (CI installs it)"
    return path


def _run(cmd: list[str]) -> dict[str, Any]:
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr
    result: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    return result


@pytest.fixture
def child(tmp_path: Path) -> Path:
    path = tmp_path / "child.py"
    path.write_text(CHILD)
    return path


def test_full_disk_at_stage_is_typed_and_leaves_nothing(tmp_path: Path, child: Path) -> None:
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    script = 'mount -t tmpfs -o size=1m tmpfs "$1" && "$2" "$3" fill "$1/run"'
    for prefix in (["-rm"], ["-m"]):
        cmd = [_tool("unshare"), *prefix, "sh", "-c", script, "sh", str(mnt)]
        proc = subprocess.run(
            [*cmd, sys.executable, str(child)], capture_output=True, text=True, check=False
        )
        if proc.returncode == 0:
            break
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["error"] == "StorageFull", result
    assert result["staging"] == [], result  # no ownerless staging dir left to look "live"
    assert not result["verifies"]


def _root_fsync_index(tmp_path: Path, child: Path) -> int:
    log = tmp_path / "probe.log"
    root = tmp_path / "probe"
    strace = _tool("strace")
    cmd = [strace, "-f", "-y", "-e", "trace=fsync", "-o", str(log)]
    _run([*cmd, sys.executable, str(child), "plain", str(root)])
    fsyncs = [line for line in log.read_text().splitlines() if " fsync(" in line]
    hits = [i for i, line in enumerate(fsyncs, 1) if f"<{root}>)" in line]
    assert len(hits) == 1, fsyncs
    return hits[0]


def test_eio_on_root_fsync_reports_unknown_durability(tmp_path: Path, child: Path) -> None:
    k = _root_fsync_index(tmp_path, child)
    strace = _tool("strace")
    inject = ["-e", "trace=fsync", "-e", f"inject=fsync:error=EIO:when={k}"]
    result = _run(
        [
            strace,
            "-f",
            "-o",
            "/dev/null",
            *inject,
            sys.executable,
            str(child),
            "plain",
            str(tmp_path / "run"),
        ]
    )
    assert result["error"] == "StorageError", result
    assert "complete and visible" in result["message"]
    assert "durability is unknown" in result["message"]
    assert "aborted" not in result["message"]
    assert result["verifies"]  # the content was fsynced before the rename: it is whole
    assert result["staging"] == []


def test_cleanup_failure_after_commit_does_not_fail_the_save(tmp_path: Path, child: Path) -> None:
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    root = tmp_path / "run"
    strace = _tool("strace")
    # rmtree removes entries with unlinkat(dirfd, name): make every such call fail.
    inject = ["-e", "trace=unlinkat", "-e", "inject=unlinkat:error=EPERM"]
    result = _run(
        [
            strace,
            "-f",
            "-o",
            "/dev/null",
            *inject,
            sys.executable,
            str(child),
            "stale",
            str(root),
            str(dead.pid),
        ]
    )
    assert "error" not in result, result
    assert result["outcome"] == "committed"
    assert result["verifies"]
    stale = Path(result["stale"]).name
    assert result["staging"] == [stale]  # it could not be removed, and that was fine

    import ckptguard  # the control: without the fault, recovery removes it

    report = ckptguard.recover(root)
    assert any(stale in action for action in report.actions)
    assert not (root / ".ckptguard" / "staging" / stale).exists()
