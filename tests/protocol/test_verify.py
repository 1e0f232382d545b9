from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

import ckptguard
from ckptguard._format.layout import MANIFEST_NAME


@pytest.fixture
def ckpt(tmp_path: Path) -> Path:
    with ckptguard.atomic_checkpoint(tmp_path / "checkpoint-1", metrics={"loss": 1.0}) as d:
        (d / "a.bin").write_bytes(os.urandom(10000))
        (d / "sub").mkdir()
        (d / "sub" / "b.bin").write_bytes(b"hello")
    return tmp_path / "checkpoint-1"


def test_ok(ckpt: Path) -> None:
    seen: list[int] = []
    report = ckptguard.verify(ckpt, progress=seen.append)
    assert report.ok
    assert report.problems == []
    assert report.files_checked == 2
    assert report.bytes_checked == 10005 == sum(seen)
    assert report.step == 1


def _flip(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))


def test_bit_flip_is_caught_by_checksums_only(ckpt: Path) -> None:
    _flip(ckpt / "a.bin", 1234)
    assert ckptguard.verify(ckpt, checksums=False).ok
    report = ckptguard.verify(ckpt)
    assert not report.ok
    assert report.problems == ["a.bin: checksum mismatch (content altered)"]


def test_truncation_missing_and_extra(ckpt: Path) -> None:
    with (ckpt / "a.bin").open("r+b") as f:
        f.truncate(100)
    (ckpt / "sub" / "b.bin").unlink()
    (ckpt / "sub" / "new.bin").write_bytes(b"x")
    report = ckptguard.verify(ckpt, checksums=False)
    assert not report.ok
    problems = sorted(report.problems)
    assert problems[:2] == ["a.bin: size 100, manifest says 10000", "sub/b.bin: missing"]
    assert len(problems) == 3
    # Not a manager's state: a framework may load it by name, so it is an error with the
    # way to remove it.
    assert problems[2].startswith("sub/new.bin: extra file not in the manifest (1 bytes)")
    assert f"rm {ckpt / 'sub' / 'new.bin'}" in problems[2]
    assert report.warnings == []


def test_a_stray_file_beside_a_state_is_a_warning(tmp_path: Path) -> None:
    """A manager state is restored from listed files only: a stray changes nothing read."""
    mgr = ckptguard.CheckpointManager(tmp_path / "run", check_environment=False)
    info = mgr.save(1, {"w": [1.0, 2.0]})
    mgr.close()
    (Path(info.path) / "notes.txt").write_text("lr looked high here\n")
    report = ckptguard.verify(info.path)
    assert report.ok, report.problems
    assert report.warnings == [
        "notes.txt: extra file not in the manifest (20 bytes); restore ignores it"
    ]
    again = ckptguard.CheckpointManager(tmp_path / "run", check_environment=False)
    latest = again.latest()  # not skipped as corrupt
    assert latest is not None
    assert latest.step == 1
    assert again.restore() == {"w": [1.0, 2.0]}
    again.close()


def test_a_stray_file_in_framework_files_stays_an_error(tmp_path: Path) -> None:
    """Files a framework loads by name (a Trainer's): a stray is an error, with the fix."""
    mgr = ckptguard.CheckpointManager(tmp_path / "run", check_environment=False)

    def write(tx: ckptguard.AtomicCheckpoint) -> None:
        (tx.staging_dir / "model.safetensors").write_bytes(b"m")

    info = mgr.save_files(3, write)
    mgr.close()
    (Path(info.path) / "notes.txt").write_text("x")
    report = ckptguard.verify(info.path)
    assert not report.ok
    (problem,) = report.problems
    assert problem.startswith("notes.txt: extra file not in the manifest (1 bytes)")
    assert f"remove it (rm {Path(info.path) / 'notes.txt'})" in problem


def test_symlinks_are_reported_not_followed(ckpt: Path, tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "b.bin").write_bytes(b"hello")  # same content: following it would "verify"
    (ckpt / "sub" / "b.bin").unlink()
    (ckpt / "sub").rmdir()
    (ckpt / "sub").symlink_to(outside)
    report = ckptguard.verify(ckpt)
    assert not report.ok
    assert "sub/b.bin: cannot open (a symlink or non-directory in its path)" in report.problems
    assert "sub: is a symlink" in report.problems


def test_checkpoint_path_symlink_and_missing(ckpt: Path, tmp_path: Path) -> None:
    (tmp_path / "alias").symlink_to(ckpt)
    assert not ckptguard.verify(tmp_path / "alias").ok
    assert not ckptguard.verify(tmp_path / "missing").ok
    assert "does not exist" in ckptguard.verify(tmp_path / "missing").problems[0]


def test_manifest_missing_or_tampered(ckpt: Path) -> None:
    manifest = ckpt / MANIFEST_NAME
    body = json.loads(manifest.read_text())
    body["metrics"]["loss"] = 0.001  # a better-looking metric, old self-checksum
    manifest.write_text(json.dumps(body))
    report = ckptguard.verify(ckpt)
    assert not report.ok
    assert "manifest_checksum" in report.problems[0]
    with pytest.raises(ckptguard.UnsafeManifest):
        ckptguard.read_manifest(str(ckpt))
    manifest.unlink()
    report = ckptguard.verify(ckpt)
    assert not report.ok
    assert "no ckptguard.json" in report.problems[0]


def test_problem_list_is_bounded(tmp_path: Path) -> None:
    with ckptguard.atomic_checkpoint(tmp_path / "checkpoint-1") as d:
        for i in range(150):
            (d / f"f{i}").write_bytes(b"x")
    for i in range(150):
        (tmp_path / "checkpoint-1" / f"f{i}").unlink()
    report = ckptguard.verify(tmp_path / "checkpoint-1")
    assert len(report.problems) == 101
    assert report.problems[-1].startswith("...")


def test_an_older_checkpoint_copied_in_under_a_newer_name_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with ckptguard.CheckpointManager(tmp_path, check_environment=False) as mgr:
        mgr.save(1, {"step": 1})
        mgr.save(2, {"step": 2})
    shutil.rmtree(tmp_path / "checkpoint-2")
    shutil.copytree(tmp_path / "checkpoint-1", tmp_path / "checkpoint-2")
    report = ckptguard.verify(tmp_path / "checkpoint-2")
    assert not report.ok
    assert "written for checkpoint-1, but this directory is checkpoint-2" in report.problems[0]
    with ckptguard.CheckpointManager(tmp_path, check_environment=False) as mgr:
        latest = mgr.latest()
        assert latest is not None
        assert latest.step == 1
        assert mgr.restore() == {"step": 1}
        assert [i.step for i in mgr.list() if i.valid] == [1]
    scan = ckptguard.scan(tmp_path)
    assert [e.name for e in scan.of_kind(ckptguard.EntryKind.COMMITTED_CORRUPT)] == ["checkpoint-2"]
    with monkeypatch.context() as m:
        m.chdir(tmp_path / "checkpoint-2")
        assert not ckptguard.verify(".").ok  # the directory's own name, not "."
    # A copy under a name that is not a step name verifies (Hugging Face pushes the
    # newest checkpoint as "last-checkpoint" and resumes from that path).
    os.rename(tmp_path / "checkpoint-2", tmp_path / "last-checkpoint")
    assert ckptguard.verify(tmp_path / "last-checkpoint").ok
    assert ckptguard.scan(tmp_path).of_kind(ckptguard.EntryKind.COMMITTED_CORRUPT) == []
