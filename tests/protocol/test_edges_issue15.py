"""Edges found by trying to break the promise (issue 15): names, owners, clocks, links.

Each test fails on the code before its fix.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import time
from pathlib import Path

import pytest

import ckptguard
from ckptguard._format.layout import MAX_NAME_LENGTH, RootLayout
from ckptguard._format.owner import WriterInfo, current_writer
from ckptguard._protocol.cleanup import retire_checkpoint
from ckptguard._protocol.recovery import EntryKind
from ckptguard._protocol.rename import stage
from ckptguard._storage.local import LocalStorage


def test_the_longest_name_fits_every_name_derived_from_it(tmp_path: Path) -> None:
    """A 198-200 character name was accepted, then could not be quarantined
    (ENAMETOOLONG: staging, trash and quarantine names add a save id)."""
    name = "c" * MAX_NAME_LENGTH
    foreign = tmp_path / name
    foreign.mkdir()
    (foreign / "half.bin").write_bytes(b"x")  # a foreign folder in the way: quarantined
    with ckptguard.atomic_checkpoint(foreign) as d:
        (d / "a.bin").write_bytes(b"1")
    assert ckptguard.verify(foreign).ok
    quarantine = Path(RootLayout(str(tmp_path)).quarantine)
    assert any(p.name.startswith(name) for p in quarantine.iterdir())
    with ckptguard.atomic_checkpoint(foreign, if_exists="replace") as d:  # through trash
        (d / "a.bin").write_bytes(b"2")
    assert (foreign / "a.bin").read_bytes() == b"2"
    assert retire_checkpoint(RootLayout(str(tmp_path)), name, storage=LocalStorage())
    assert not foreign.exists()
    with pytest.raises(ckptguard.InvalidCheckpointName, match=f"at most {MAX_NAME_LENGTH}"):
        ckptguard.atomic_checkpoint(tmp_path / (name + "c"))


def test_a_dead_writers_staging_is_stale_after_a_hostname_change(
    tmp_path: Path, dead_writer: WriterInfo
) -> None:
    """Same boot id and pid namespace decide, whatever the hostname now says (it was
    kept for stale_after, 6 h)."""
    renamed = dataclasses.replace(dead_writer, host="the-old-hostname")
    staging = stage(tmp_path, "checkpoint-1", writer=renamed)
    report = ckptguard.recover(tmp_path, stale_after=3600)
    assert not os.path.exists(staging.path)
    assert any("removed stale staging" in a for a in report.actions)


def test_a_live_writer_whose_staging_was_removed_gets_a_typed_error(tmp_path: Path) -> None:
    """It was a builtin FileNotFoundError from the next write."""
    with (
        pytest.raises(ckptguard.StorageError, match="removed while this save wrote"),
        ckptguard.atomic_checkpoint(tmp_path / "checkpoint-1") as d,
    ):
        (d / "a.bin").write_bytes(b"1")
        shutil.rmtree(d)  # another process's cleanup judged it stale
        (d / "b.bin").write_bytes(b"2")
    assert not (tmp_path / "checkpoint-1").exists()


def test_a_staging_dir_changed_in_the_future_counts_as_changed_now(tmp_path: Path) -> None:
    """It was reported as "changed -31536000s ago"."""
    writer = dataclasses.replace(current_writer(), host="other-node", boot_id="another-boot")
    staging = stage(tmp_path, "checkpoint-1", writer=writer)
    future = time.time() + 365 * 24 * 3600
    for path in (staging.path, *(str(p) for p in Path(staging.path).iterdir())):
        os.utime(path, (future, future))
    entries = ckptguard.scan(tmp_path, stale_after=3600).of_kind(EntryKind.STAGING_LIVE)
    assert len(entries) == 1
    assert "changed 0s ago" in entries[0].detail, entries[0].detail


def test_a_file_name_that_is_not_utf8_gets_a_hint_about_its_name(tmp_path: Path) -> None:
    """It got the symlink/device hint."""
    with (
        pytest.raises(ckptguard.UnsupportedFile) as info,
        ckptguard.atomic_checkpoint(tmp_path / "checkpoint-1") as d,
    ):
        Path(os.fsdecode(os.path.join(os.fsencode(d), b"w\xff.bin"))).write_bytes(b"1")
    assert "rename the file" in info.value.hint
    assert "symlink" not in info.value.hint


def test_sealing_leaves_the_mode_of_a_file_linked_in_from_outside(tmp_path: Path) -> None:
    """The seal's chmod changed the mode of the outside file too (a hard link)."""
    outside = tmp_path / "shared.bin"
    outside.write_bytes(b"shared")
    outside.chmod(0o666)
    root = tmp_path / "run"
    with ckptguard.atomic_checkpoint(root / "checkpoint-1") as d:
        os.link(outside, d / "shared.bin")
        (d / "own.bin").write_bytes(b"own")
    assert outside.stat().st_mode & 0o777 == 0o666
    assert ckptguard.verify(root / "checkpoint-1").ok
