"""Defects found in review, each pinned by a test that failed before its fix."""

from __future__ import annotations

import dataclasses
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

import ckptguard
from ckptguard import Outcome
from ckptguard._format.layout import MANIFEST_NAME, RootLayout, new_save_id
from ckptguard._protocol.locking import root_lock
from ckptguard._protocol.rename import commit, seal, stage
from ckptguard._storage.faults import set_fault_hook

CHILD = Path(__file__).parents[1] / "crash_child.py"
POINT = "commit.moved_to_trash"


def _save(root: Path, name: str, data: bytes) -> None:
    with ckptguard.atomic_checkpoint(root / name, if_exists="replace") as d:
        (d / "w.bin").write_bytes(data)


def test_error_between_the_two_renames_of_a_replace_restores_the_old(tmp_path: Path) -> None:
    _save(tmp_path, "checkpoint-5", b"old")

    def hook(point: str) -> None:
        if point == "commit.moved_to_trash":
            raise KeyboardInterrupt

    previous = set_fault_hook(hook)
    try:
        with pytest.raises(KeyboardInterrupt):
            _save(tmp_path, "checkpoint-5", b"new")
    finally:
        set_fault_hook(previous)
    assert (tmp_path / "checkpoint-5" / "w.bin").read_bytes() == b"old"
    latest = ckptguard.scan(tmp_path).latest
    assert latest is not None
    assert latest.name == "checkpoint-5"
    assert os.listdir(RootLayout(str(tmp_path)).trash) == []


def test_next_save_repairs_a_replace_killed_between_its_renames(tmp_path: Path) -> None:
    _save(tmp_path, "checkpoint-5", b"old")
    marker = tmp_path / "reached"
    proc = subprocess.run(
        [
            sys.executable,
            str(CHILD),
            str(tmp_path),
            "checkpoint-5",
            "replace",
            "commit.moved_to_trash",
            str(marker),
        ],
        check=False,
        timeout=120,
    )
    assert proc.returncode == -signal.SIGKILL
    assert marker.exists()
    assert not (tmp_path / "checkpoint-5").exists()  # hidden in trash by the kill
    _save(tmp_path, "checkpoint-6", b"other")  # no recover() call: the save's publish repairs
    assert (tmp_path / "checkpoint-5" / "w.bin").read_bytes() == b"old"
    assert ckptguard.verify(tmp_path / "checkpoint-5").ok


def test_symlinked_meta_dirs_are_refused(tmp_path: Path) -> None:
    root = tmp_path / "run"
    _save(root, "checkpoint-1", b"x")
    victim = tmp_path / "victim"
    victim.mkdir()
    precious = victim / f"checkpoint-1.{new_save_id()}"
    precious.mkdir()
    trash = Path(RootLayout(str(root)).trash)
    trash.rmdir()
    trash.symlink_to(victim)
    with pytest.raises(ckptguard.UnsupportedFile, match="symlink"):
        ckptguard.recover(root)
    with pytest.raises(ckptguard.UnsupportedFile):
        ckptguard.scan(root)
    with pytest.raises(ckptguard.UnsupportedFile):
        _save(root, "checkpoint-2", b"y")
    assert precious.exists()


def test_unreadable_manifest_is_a_problem_not_a_crash(tmp_path: Path) -> None:
    _save(tmp_path, "checkpoint-1", b"x")
    _save(tmp_path, "checkpoint-2", b"y")
    manifest = tmp_path / "checkpoint-2" / MANIFEST_NAME
    manifest.unlink()
    with socket.socket(socket.AF_UNIX) as sock:  # open(2) on a socket fails with ENXIO
        sock.bind(str(manifest))
        report = ckptguard.verify(tmp_path / "checkpoint-2")
        assert not report.ok
        assert "cannot read" in report.problems[0]
        entries = ckptguard.scan(tmp_path)
        latest = entries.latest
        assert latest is not None
        assert latest.name == "checkpoint-1"
        with pytest.raises(ckptguard.StorageError):
            ckptguard.read_manifest(str(tmp_path / "checkpoint-2"))


def test_lock_errors_are_typed(tmp_path: Path) -> None:
    _save(tmp_path, "checkpoint-1", b"x")
    lock = Path(RootLayout(str(tmp_path)).lock)
    lock.unlink()
    lock.mkdir()  # open(2) of the lock fails with EISDIR
    with pytest.raises(ckptguard.StorageError) as info:
        _save(tmp_path, "checkpoint-2", b"y")
    assert "lock" in str(info.value)
    assert os.listdir(RootLayout(str(tmp_path)).staging) == []


def test_peer_of_the_same_save_sees_success(tmp_path: Path) -> None:
    first = stage(tmp_path, "checkpoint-3")
    (Path(first.path) / "w.bin").write_bytes(b"x")
    manifest = seal(first)
    peer = dataclasses.replace(first)  # another rank holding the same staging dir
    with root_lock(first.layout):
        assert commit(first, manifest).outcome == Outcome.COMMITTED
        result = commit(peer, manifest)
    assert result.outcome == Outcome.ALREADY_COMMITTED
    assert ckptguard.verify(tmp_path / "checkpoint-3").ok


def test_replace_never_puts_an_older_save_over_a_newer(tmp_path: Path) -> None:
    older = stage(tmp_path, "checkpoint-4")
    (Path(older.path) / "w.bin").write_bytes(b"older")
    older_manifest = seal(older)
    newer = stage(tmp_path, "checkpoint-4")
    (Path(newer.path) / "w.bin").write_bytes(b"newer")
    newer_manifest = seal(newer)
    with root_lock(newer.layout):
        assert commit(newer, newer_manifest).outcome == Outcome.COMMITTED
        result = commit(older, older_manifest, if_exists="replace")
    assert result.outcome == Outcome.KEPT_EXISTING
    assert (tmp_path / "checkpoint-4" / "w.bin").read_bytes() == b"newer"


def test_file_name_that_is_not_utf8_is_refused_cleanly(tmp_path: Path) -> None:
    with (
        pytest.raises(ckptguard.UnsupportedFile, match="UTF-8"),
        ckptguard.atomic_checkpoint(tmp_path / "checkpoint-1") as d,
    ):
        (Path(os.fsdecode(bytes(d) + b"/bad-\xff-name"))).write_bytes(b"x")
    assert not (tmp_path / "checkpoint-1").exists()


def _deep_dirs(top: Path, depth: int) -> None:
    """Nest ``depth`` directories named "d" under ``top`` without recursion (fd-relative)."""
    fd = os.open(top, os.O_RDONLY | os.O_DIRECTORY)
    for _ in range(depth):
        os.mkdir("d", dir_fd=fd)
        nxt = os.open("d", os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
        os.close(fd)
        fd = nxt
    os.close(fd)


def _remove_deep_dirs(top: Path, depth: int) -> None:
    fds = [os.open(top, os.O_RDONLY | os.O_DIRECTORY)]
    for _ in range(depth - 1):
        fds.append(os.open("d", os.O_RDONLY | os.O_DIRECTORY, dir_fd=fds[-1]))
    while fds:
        fd = fds.pop()
        os.rmdir("d", dir_fd=fd)
        os.close(fd)


def test_deep_trees_are_reported_not_a_recursion_error(tmp_path: Path) -> None:
    _save(tmp_path, "checkpoint-1", b"x")
    _deep_dirs(tmp_path / "checkpoint-1", 1200)
    try:
        report = ckptguard.verify(tmp_path / "checkpoint-1")
        assert not report.ok
        assert any("nested deeper" in p for p in report.problems)
    finally:
        _remove_deep_dirs(tmp_path / "checkpoint-1", 1200)
    with (
        pytest.raises(ckptguard.UnsupportedFile, match="nested deeper"),
        ckptguard.atomic_checkpoint(tmp_path / "checkpoint-2") as d,
    ):
        _deep_dirs(d, 100)
    assert not (tmp_path / "checkpoint-2").exists()


REPLACE_RACE_CHILD = """
import sys, time
from pathlib import Path
import numpy as np
import ckptguard
from ckptguard.testing import on_step

role, root = sys.argv[1], sys.argv[2]
marks = Path(root + ".marks")

def wait_for(name):
    while not (marks / name).exists():
        time.sleep(0.001)

def hook(point):
    if role == "A" and point in {"seal.done", "commit.renamed"}:
        (marks / f"A.{point}").touch()
    if role == "B" and point == "seal.done":
        wait_for("A.commit.renamed")  # B commits right after A
    if role == "B" and point == "commit.moved_to_trash":
        (marks / "B.moved_to_trash").touch()
        time.sleep(1.0)  # a slow second rename (NFS): meanwhile the name is empty

if role == "A":  # A is descheduled between its commit and its read-back
    def pause(frame, event, arg):
        if event == "call" and frame.f_code.co_name == "_verify_new":
            wait_for("B.moved_to_trash")
    sys.setprofile(pause)
else:
    wait_for("A.seal.done")  # B seals after A: B's save is the newer one
mgr = ckptguard.CheckpointManager(root, check_environment=False)
with on_step(hook):
    try:
        mgr.save(7, {"w": np.full(8, 1.0 if role == "A" else 2.0)})
        print("returned")
    except ckptguard.CheckpointError as exc:
        print("raised", type(exc).__name__, exc)
"""


def test_a_commit_replaced_by_a_newer_peer_save_is_not_reported_corrupt(tmp_path: Path) -> None:
    # Found by the gauntlet (8 processes x 300 rounds, about once): A's read-back after its
    # commit fell between the two renames of B's replace and raised CorruptCheckpoint.
    root = tmp_path / "run"
    Path(f"{root}.marks").mkdir()
    script = tmp_path / "child.py"
    script.write_text(REPLACE_RACE_CHILD)
    procs = {
        role: subprocess.Popen(
            [sys.executable, str(script), role, str(root)], stdout=subprocess.PIPE, text=True
        )
        for role in ("A", "B")
    }
    try:
        out = {role: p.communicate(timeout=120)[0].strip() for role, p in procs.items()}
    finally:
        for p in procs.values():
            p.kill()
            p.wait()
    assert out == {"A": "returned", "B": "returned"}
    with ckptguard.CheckpointManager(root, check_environment=False) as mgr:
        assert mgr.verify(7).ok
        assert mgr.restore(7)["w"][0] == 2.0
