from __future__ import annotations

import dataclasses
import os
import time
from pathlib import Path

import ckptguard
from ckptguard import EntryKind
from ckptguard._format.layout import OWNER_NAME, RootLayout, new_save_id
from ckptguard._format.owner import WriterInfo, current_writer
from ckptguard._protocol.rename import stage


def _save(root: Path, name: str, data: bytes = b"x") -> Path:
    with ckptguard.atomic_checkpoint(root / name, if_exists="replace") as d:
        (d / "w.bin").write_bytes(data)
    return root / name


def _kinds(report: ckptguard.RecoveryReport) -> dict[str, EntryKind]:
    return {os.path.basename(e.path): e.kind for e in report.entries}


def test_classifies_every_entry(tmp_path: Path, dead_writer: WriterInfo) -> None:
    root = tmp_path / "run"
    _save(root, "checkpoint-1")
    corrupt = _save(root, "checkpoint-2", b"abc")
    (corrupt / "w.bin").write_bytes(b"abd")
    (root / "checkpoint-3").mkdir()  # half-written by a tool without ckptguard
    (root / "notes.txt").write_text("mine")
    live = stage(root, "checkpoint-4")
    stale = stage(root, "checkpoint-5", writer=dead_writer)
    layout = RootLayout(str(root))
    trash = Path(layout.trash, f"checkpoint-1.{new_save_id()}")
    trash.mkdir()
    quarantined = Path(layout.quarantine, f"checkpoint-9.{new_save_id()}")
    quarantined.mkdir()
    Path(str(quarantined) + ".json").write_text("{}")

    report = ckptguard.scan(root)
    assert _kinds(report) == {
        "checkpoint-1": EntryKind.COMMITTED_VALID,
        "checkpoint-2": EntryKind.COMMITTED_CORRUPT,
        "checkpoint-3": EntryKind.FOREIGN,
        "notes.txt": EntryKind.FOREIGN,
        os.path.basename(live.path): EntryKind.STAGING_LIVE,
        os.path.basename(stale.path): EntryKind.STAGING_STALE,
        trash.name: EntryKind.TRASH,
        quarantined.name: EntryKind.QUARANTINE,
    }
    corrupt_entry = report.of_kind(EntryKind.COMMITTED_CORRUPT)[0]
    assert "checksum mismatch" in corrupt_entry.detail
    latest = report.latest
    assert latest is not None
    assert latest.name == "checkpoint-1"

    repaired = ckptguard.recover(root)
    kinds = _kinds(repaired)
    assert os.path.basename(stale.path) not in kinds  # removed
    assert kinds[os.path.basename(live.path)] == EntryKind.STAGING_LIVE  # kept
    assert trash.name not in kinds  # checkpoint-1 is valid, so its trash copy goes
    # Never touched: corrupt, foreign, quarantine.
    assert kinds["checkpoint-2"] == EntryKind.COMMITTED_CORRUPT
    assert (root / "checkpoint-3").is_dir()
    assert (root / "notes.txt").read_text() == "mine"
    assert quarantined.exists()
    assert len(repaired.actions) == 2


def test_staging_of_unknown_owner_goes_stale_by_age(tmp_path: Path) -> None:
    root = tmp_path / "run"
    writer = dataclasses.replace(current_writer(), host="other-node", boot_id="x")
    staging = stage(root, "checkpoint-1", writer=writer)
    report = ckptguard.scan(root, stale_after=3600)
    assert report.of_kind(EntryKind.STAGING_LIVE)[0].path == staging.path
    old = time.time() - 7200
    for name in os.listdir(staging.path):
        os.utime(os.path.join(staging.path, name), (old, old))
    os.utime(staging.path, (old, old))
    report = ckptguard.recover(root, stale_after=3600)
    assert report.of_kind(EntryKind.STAGING_LIVE) == []
    assert not os.path.exists(staging.path)
    assert "unchanged for" in report.actions[0]


def _ownerless_staging(root: Path, pid: int, age: float) -> str:
    """A staging dir as a SIGKILL between its mkdir and its owner file leaves it."""
    save_id = new_save_id().replace(f"-{os.getpid()}-", f"-{pid}-")
    path = os.path.join(RootLayout(str(root)).staging, f"checkpoint-1.{save_id}")
    os.makedirs(path, mode=0o700)
    when = time.time() - age
    os.utime(path, (when, when))
    return path


def test_ownerless_staging_of_a_dead_writer_here_goes_stale_after_a_grace(
    tmp_path: Path, dead_writer: WriterInfo
) -> None:
    # Found by the gauntlet's random kills (about 12 in 1000): kept for stale_after (6 h).
    root = tmp_path / "run"
    ckptguard.recover(root)  # creates the layout
    dead = _ownerless_staging(root, dead_writer.pid, age=60)
    torn = _ownerless_staging(root, dead_writer.pid, age=60)
    Path(torn, OWNER_NAME).write_bytes(b'{"save_id": "2026')  # killed mid-write
    young = _ownerless_staging(root, dead_writer.pid, age=0)  # its writer may be mid-mkdir
    alive = _ownerless_staging(root, os.getpid(), age=60)
    written = _ownerless_staging(root, dead_writer.pid, age=60)
    Path(written, "model.bin").write_bytes(b"x")  # its writer got further: the 6 h rule
    absurd = _ownerless_staging(root, 2**40, age=60)
    for path in (torn, written):
        os.utime(path, (time.time() - 60,) * 2)
        for name in os.listdir(path):
            os.utime(os.path.join(path, name), (time.time() - 60,) * 2)
    report = ckptguard.recover(root)
    assert not os.path.exists(dead)
    assert not os.path.exists(torn)
    assert sum("no owner file (or a torn one), and its writer" in a for a in report.actions) == 2
    live = {e.path for e in report.of_kind(EntryKind.STAGING_LIVE)}
    assert live == {young, alive, written, absurd}


def test_interrupted_replace_is_rolled_back(tmp_path: Path) -> None:
    root = tmp_path / "run"
    final = _save(root, "checkpoint-1", b"old")
    layout = RootLayout(str(root))
    # The state a crash between "old -> trash" and "new -> final" leaves:
    os.rename(final, Path(layout.trash, f"checkpoint-1.{new_save_id()}"))
    report = ckptguard.recover(root)
    assert (final / "w.bin").read_bytes() == b"old"
    assert ckptguard.verify(final).ok
    assert os.listdir(layout.trash) == []
    assert "interrupted replace" in report.actions[0]


def test_trash_kept_while_final_is_not_valid(tmp_path: Path) -> None:
    root = tmp_path / "run"
    final = _save(root, "checkpoint-1", b"old")
    layout = RootLayout(str(root))
    trash = Path(layout.trash, f"checkpoint-1.{new_save_id()}")
    os.rename(final, trash)
    final.mkdir()  # something invalid now holds the name
    ckptguard.recover(root)
    assert trash.exists()
    assert not (final / "w.bin").exists()


def test_missing_root_is_empty_and_untouched(tmp_path: Path) -> None:
    report = ckptguard.recover(tmp_path / "nothing")
    assert report.entries == ()
    assert report.latest is None
    assert not (tmp_path / "nothing").exists()


def test_latest_is_highest_step(tmp_path: Path) -> None:
    root = tmp_path / "run"
    for step in [2, 10, 9]:
        _save(root, f"checkpoint-{step}")
    latest = ckptguard.scan(root).latest
    assert latest is not None
    assert latest.step == 10
    assert [e.step for e in ckptguard.scan(root).valid] == [2, 9, 10]
