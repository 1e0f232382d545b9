"""A save is SIGKILLed at every named fault point; the root must always recover.

After each kill: recover() repairs the root, no committed checkpoint is corrupt, the
newest checkpoint that verifies is the last one fully committed, and the next save
leaves no staging or trash behind. The test fails if a configured point is never reached.
"""

from __future__ import annotations

import ast
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

import ckptguard
from ckptguard import EntryKind
from ckptguard._format.layout import RootLayout
from ckptguard._storage.faults import (
    DEFERRED_FAULT_POINTS,
    FAULT_POINTS,
    FILE_FAULT_POINTS,
    REMOTE_FAULT_POINTS,
    REUSE_FAULT_POINTS,
)

CHILD = Path(__file__).parents[1] / "crash_child.py"
SRC = Path(ckptguard.__file__).parent

# Points after which the new save is committed (the final rename has happened).
AFTER_RENAME = {"commit.renamed", "publish.root_synced", "publish.done"}

# (scenario, point): "new" saves checkpoint-3; "replace" re-saves checkpoint-2 with
# if_exists="replace"; "quarantine" saves checkpoint-3 over a foreign folder of that name.
CASES = [
    ("new", p) for p in FAULT_POINTS if p not in {"commit.moved_to_trash", "commit.quarantined"}
]
CASES += [
    ("replace", p)
    for p in FAULT_POINTS
    if p.startswith(("commit.", "publish.")) and p != "commit.quarantined"
]
CASES += [("quarantine", "commit.quarantined")]


def test_every_fault_point_is_exercised() -> None:
    assert {p for _, p in CASES} == set(FAULT_POINTS)


def test_fault_point_names_match_the_code() -> None:
    """Every fault_point("...") call in the package uses a listed name, and vice versa."""
    called: set[str] = set()
    for path in SRC.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Name)
                and node.func.id == "fault_point"
            ):
                arg = node.args[0]
                assert isinstance(arg, ast.Constant)
                assert isinstance(arg.value, str)
                called.add(arg.value)
    listed = (
        FAULT_POINTS
        + REMOTE_FAULT_POINTS
        + FILE_FAULT_POINTS
        + DEFERRED_FAULT_POINTS
        + REUSE_FAULT_POINTS
    )
    assert called == set(listed)


def _save(root: Path, name: str, payload: bytes) -> None:
    with ckptguard.atomic_checkpoint(root / name, if_exists="replace") as staging:
        (staging / "weights.bin").write_bytes(payload)


def _content(path: Path) -> bytes:
    return (path / "weights.bin").read_bytes()


@pytest.mark.parametrize(("scenario", "point"), CASES, ids=[f"{s}-{p}" for s, p in CASES])
def test_kill_at_fault_point(tmp_path: Path, scenario: str, point: str) -> None:
    root = tmp_path / "run"
    layout = RootLayout(str(root))
    _save(root, "checkpoint-1", b"one")
    _save(root, "checkpoint-2", b"two")
    name, if_exists = "checkpoint-3", "keep"
    if scenario == "replace":
        name, if_exists = "checkpoint-2", "replace"
    if scenario == "quarantine":
        (root / "checkpoint-3").mkdir()
        (root / "checkpoint-3" / "half-written.bin").write_bytes(b"partial")

    marker = tmp_path / "reached"
    proc = subprocess.run(
        [sys.executable, str(CHILD), str(root), name, if_exists, point, str(marker)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert marker.exists(), f"fault point {point} never reached: {proc.stderr}"
    assert proc.returncode == -signal.SIGKILL, proc.stderr

    report = ckptguard.recover(root)
    assert report.of_kind(EntryKind.COMMITTED_CORRUPT) == []
    assert report.of_kind(EntryKind.STAGING_LIVE) == []
    assert report.of_kind(EntryKind.STAGING_STALE) == []
    assert os.listdir(layout.staging) == []
    valid = {e.name: Path(e.path) for e in report.valid}
    committed = point in AFTER_RENAME

    if scenario == "new":
        expected = {"checkpoint-1", "checkpoint-2"} | ({"checkpoint-3"} if committed else set())
        assert set(valid) == expected
        latest = report.latest
        assert latest is not None
        assert latest.name == ("checkpoint-3" if committed else "checkpoint-2")
    elif scenario == "replace":
        assert set(valid) == {"checkpoint-1", "checkpoint-2"}
        # Before the second rename the old checkpoint is rolled back from trash; after
        # it, the new one stands. Never neither, never a mix.
        if committed:
            assert len(_content(valid["checkpoint-2"])) == 256 * 1024
        else:
            assert _content(valid["checkpoint-2"]) == b"two"
        assert os.listdir(layout.trash) == []
    else:
        assert set(valid) == {"checkpoint-1", "checkpoint-2"}
        # The foreign folder was moved aside before the kill, never deleted.
        quarantined = report.of_kind(EntryKind.QUARANTINE)
        assert len(quarantined) == 1
        assert (Path(quarantined[0].path) / "half-written.bin").read_bytes() == b"partial"

    for entry in report.valid:
        assert ckptguard.verify(entry.path).ok

    # The next save works and leaves nothing behind.
    _save(root, "checkpoint-4", b"four")
    assert ckptguard.verify(root / "checkpoint-4").ok
    assert os.listdir(layout.staging) == []
    assert os.listdir(layout.trash) == []
    after = ckptguard.scan(root)
    latest = after.latest
    assert latest is not None
    assert latest.name == "checkpoint-4"
