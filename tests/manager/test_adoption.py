"""Checkpoints written before ckptguard: the structural check, the choice, and sealing."""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import ckptguard
from ckptguard._format.layout import ACCELERATE_NAMING, HF_NAMING, MANIFEST_NAME, RootLayout
from ckptguard._manager.adoption import adopt, adoptable, newest_adoptable, structural_problems


def _trainer_checkpoint(path: Path, step: int) -> Path:
    """What a Trainer writes, without ckptguard: weights, optimizer, trainer state."""
    path.mkdir(parents=True)
    save_file({"w": torch.full((4, 4), float(step))}, path / "model.safetensors")
    torch.save({"state": {0: {"exp_avg": torch.ones(3)}}}, path / "optimizer.pt")
    (path / "trainer_state.json").write_text(json.dumps({"global_step": step}))
    (path / "config.json").write_text("{}")
    return path


def _cut(path: Path, keep: float = 0.5) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


@pytest.mark.parametrize(
    ("damage", "expected"),
    [
        (lambda p: _cut(p / "model.safetensors"), "invalid safetensors file"),
        (lambda p: _cut(p / "model.safetensors", 0.95), "outside the data"),
        (lambda p: _cut(p / "optimizer.pt", 0.9), "not a complete zip archive"),
        (lambda p: (p / "trainer_state.json").write_text('{"global_step": 1'), "not valid JSON"),
        (lambda p: (p / "trainer_state.json").write_text("{}"), "no global_step"),
        (lambda p: (p / "model.safetensors").write_bytes(b""), "empty"),
        (lambda p: (p / "model.safetensors").unlink(), "no weights file"),
        (
            lambda p: (p / "model.safetensors.index.json").write_text(
                json.dumps({"weight_map": {"w": "model-00002-of-00002.safetensors"}})
            ),
            "names shard model-00002-of-00002.safetensors, which is missing",
        ),
        (lambda p: (p / "link.bin").symlink_to(p / "optimizer.pt"), "a symlink"),
    ],
)
def test_the_structural_check_finds_what_a_crash_leaves(
    tmp_path: Path, damage: object, expected: str
) -> None:
    ckpt = _trainer_checkpoint(tmp_path / "checkpoint-10", 10)
    assert structural_problems(str(ckpt)) == []
    damage(ckpt)  # type: ignore[operator]
    problems = structural_problems(str(ckpt))
    assert any(expected in p for p in problems), problems


def test_resume_takes_the_newest_complete_one_unless_a_verified_one_is_newer(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    root = tmp_path / "out"
    for step in (10, 20, 30):
        _trainer_checkpoint(root / f"checkpoint-{step}", step)
    _cut(root / "checkpoint-30" / "model.safetensors")
    with caplog.at_level(logging.WARNING, "ckptguard.adoption"):
        chosen = newest_adoptable(str(root), HF_NAMING, newer_than=None)
    assert chosen is not None
    assert chosen.step == 20
    assert "skipping" in caplog.text
    assert "checkpoint-30" in caplog.text
    assert "NOT checksummed" in caplog.text
    assert newest_adoptable(str(root), HF_NAMING, newer_than=20) is None
    assert newest_adoptable(str(root), HF_NAMING, newer_than=25) is None
    assert [a.step for a in adoptable(str(root), HF_NAMING)] == [30, 20, 10]


def test_adopt_seals_in_place_and_keeps_the_original(tmp_path: Path) -> None:
    root = tmp_path / "out"
    ckpt = _trainer_checkpoint(root / "checkpoint-10", 10)
    before = {p.name: p.read_bytes() for p in ckpt.iterdir()}
    (candidate,) = adoptable(str(root), HF_NAMING)
    result = adopt(candidate, framework="transformers")
    report = ckptguard.verify(ckpt)
    assert report.ok, report.problems
    assert report.manifest is not None
    assert report.manifest.step == 10
    assert {f.path for f in report.manifest.files} == set(before)
    assert {p.name: p.read_bytes() for p in ckpt.iterdir() if p.name != MANIFEST_NAME} == before
    assert result is not None
    assert result.quarantined is not None
    kept = Path(result.quarantined)
    assert sorted(p.name for p in kept.iterdir()) == sorted(before)
    # Hard links: the original costs no extra space.
    assert os.stat(kept / "model.safetensors").st_ino == os.stat(ckpt / "model.safetensors").st_ino
    assert adoptable(str(root), HF_NAMING) == []


def test_adopt_refuses_a_broken_checkpoint(tmp_path: Path) -> None:
    root = tmp_path / "out"
    ckpt = _trainer_checkpoint(root / "checkpoint-10", 10)
    _cut(ckpt / "optimizer.pt", 0.9)
    (candidate,) = adoptable(str(root), HF_NAMING)
    with pytest.raises(ckptguard.CorruptCheckpoint, match="not adopting"):
        adopt(candidate)
    assert not (ckpt / MANIFEST_NAME).exists()


def test_accelerate_checkpoints_are_adopted_too(tmp_path: Path) -> None:
    root = tmp_path / "checkpoints"
    ckpt = root / "checkpoint_3"
    ckpt.mkdir(parents=True)
    save_file({"w": torch.ones(2)}, ckpt / "model.safetensors")
    torch.save({"lr": 0.1}, ckpt / "optimizer.bin")
    (found,) = adoptable(str(root), ACCELERATE_NAMING)
    assert found.step == 3
    assert found.ok
    assert adoptable(str(root), HF_NAMING) == []


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "ckptguard", *args],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_the_adopt_command_is_a_dry_run_without_yes(tmp_path: Path) -> None:
    root = tmp_path / "out"
    for step in (10, 20):
        _trainer_checkpoint(root / f"checkpoint-{step}", step)
    _cut(root / "checkpoint-20" / "model.safetensors")
    dry = _cli("adopt", str(root), "--json")
    assert dry.returncode == 1, dry.stderr  # one of them cannot be sealed
    doc = json.loads(dry.stdout)
    assert doc["dry_run"] is True
    rows = {Path(r["path"]).name: r for r in doc["checkpoints"]}
    assert rows["checkpoint-10"]["action"] == "seal"
    assert rows["checkpoint-10"]["done"] is False
    assert rows["checkpoint-20"]["action"] == "skip"
    assert "invalid safetensors" in rows["checkpoint-20"]["problems"][0]["problem"]
    assert not (root / "checkpoint-10" / MANIFEST_NAME).exists()  # a dry run wrote nothing

    shutil.rmtree(root / "checkpoint-20")
    done = _cli("adopt", str(root), "--yes")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "sealed" in done.stdout
    assert ckptguard.verify(root / "checkpoint-10").ok
    assert os.listdir(RootLayout(str(root)).quarantine)  # the original, until clean
    again = _cli("adopt", str(root))
    assert again.returncode == 0
    assert "nothing to adopt" in again.stdout


def test_adopt_gives_plain_ckpt_files_their_sidecar(tmp_path: Path) -> None:
    """Lightning's files written without ckptguard: sealed by a sidecar, bytes untouched."""
    root = tmp_path / "lightning"
    root.mkdir()
    torch.save({"global_step": 20}, root / "epoch=1-step=20.ckpt")
    torch.save({"global_step": 30}, root / "last.ckpt")
    torch.save({"global_step": 40}, root / "epoch=2-step=40.ckpt")
    _cut(root / "epoch=2-step=40.ckpt", 0.7)  # killed mid-write: not sealed
    before = (root / "epoch=1-step=20.ckpt").read_bytes()
    assert not ckptguard.verify(root / "epoch=1-step=20.ckpt").ok  # no sidecar yet
    dry = _cli("adopt", str(root), "--json")
    assert dry.returncode == 1, dry.stdout
    rows = {Path(r["path"]).name: r for r in json.loads(dry.stdout)["checkpoints"]}
    assert rows["epoch=1-step=20.ckpt"]["action"] == "seal"
    assert rows["last.ckpt"]["action"] == "seal"
    assert rows["epoch=2-step=40.ckpt"]["action"] == "skip"
    done = _cli("adopt", str(root), "--yes")
    assert done.returncode == 1  # the cut file stays unsealed
    report = ckptguard.verify(root / "epoch=1-step=20.ckpt")
    assert report.ok, report.problems
    assert report.step == 20
    assert ckptguard.verify(root / "last.ckpt").ok
    assert not ckptguard.verify(root / "epoch=2-step=40.ckpt").ok
    assert (root / "epoch=1-step=20.ckpt").read_bytes() == before
