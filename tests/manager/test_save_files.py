"""The pieces the framework integrations stand on, without any framework.

``CheckpointManager.save_files`` (files written by other code, a ``prepare`` step before
the seal, ``also_keep`` for retention), naming schemes (``checkpoint-<n>`` and
Accelerate's ``checkpoint_<n>``), ``retire_checkpoint``, and names Lightning makes.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any, cast

import pytest

import ckptguard
from ckptguard._errors import CheckpointError, InvalidCheckpointName
from ckptguard._format.layout import ACCELERATE_NAMING, HF_NAMING, Naming, RootLayout, validate_name
from ckptguard._protocol.cleanup import retire_checkpoint
from ckptguard._protocol.transaction import AtomicCheckpoint
from ckptguard._storage.local import LocalStorage


def _writer(content: bytes, *, nested: str | None = None) -> Callable[[AtomicCheckpoint], None]:
    """A ``write(tx)`` that writes one file, optionally into a subdirectory."""

    def write(tx: AtomicCheckpoint) -> None:
        target = tx.staging_dir if nested is None else tx.staging_dir / nested
        target.mkdir(exist_ok=True)
        (target / "weights.bin").write_bytes(content)

    return write


def test_naming_round_trips_and_rejects_other_schemes() -> None:
    assert HF_NAMING.name(30) == "checkpoint-30"
    assert HF_NAMING.step("checkpoint-30") == 30
    assert ACCELERATE_NAMING.name(2) == "checkpoint_2"
    assert ACCELERATE_NAMING.step("checkpoint_2") == 2
    for other in ("checkpoint_2", "checkpoint-", "checkpoint-1a", "checkpoint-٣", "x-1"):
        assert HF_NAMING.step(other) is None
    assert ACCELERATE_NAMING.step("checkpoint-2") is None
    for bad in (-1, True, 1.5):
        with pytest.raises(InvalidCheckpointName):
            HF_NAMING.name(cast("Any", bad))  # type-checked callers pass ints; users may not
    with pytest.raises(InvalidCheckpointName):
        Naming("../up-")


def test_lightning_names_are_valid_checkpoint_names() -> None:
    assert validate_name("epoch=1-step=20.ckpt") == "epoch=1-step=20.ckpt"
    for bad in ("=x", "a/b=1", "a b=1"):
        with pytest.raises(InvalidCheckpointName):
            validate_name(bad)


def test_save_files_commits_what_other_code_wrote(tmp_path: Path) -> None:
    mgr = ckptguard.CheckpointManager(tmp_path, keep_last=None)
    info = mgr.save_files(7, _writer(b"abc"), metrics={"loss": 0.5}, metadata={"by": "test"})
    assert info.path == str(tmp_path / "checkpoint-7")
    assert info.valid
    assert info.metrics == {"loss": 0.5}
    report = ckptguard.verify(info.path)
    assert report.ok
    assert report.manifest is not None
    assert report.manifest.step == 7
    assert [f.path for f in report.manifest.files] == ["weights.bin"]
    assert report.manifest.metadata["by"] == "test"
    # A framework's own files are not a CheckpointManager state: restore says so clearly.
    with pytest.raises(CheckpointError, match="framework"):
        mgr.restore(7)


def test_prepare_runs_before_the_seal_and_its_failure_commits_nothing(tmp_path: Path) -> None:
    mgr = ckptguard.CheckpointManager(tmp_path)
    seen: list[str] = []

    def hoist(staging: Path) -> None:
        seen.extend(sorted(n for n in os.listdir(staging) if not n.startswith(".")))
        os.rename(staging / "inner" / "weights.bin", staging / "weights.bin")
        os.rmdir(staging / "inner")

    info = mgr.save_files(1, _writer(b"x", nested="inner"), prepare=hoist)
    assert seen == ["inner"]
    assert sorted(os.listdir(info.path)) == ["ckptguard.json", "weights.bin"]

    def broken(staging: Path) -> None:
        raise RuntimeError(f"cannot prepare {staging.name}")

    with pytest.raises(RuntimeError, match="cannot prepare"):
        mgr.save_files(2, _writer(b"y"), prepare=broken)
    assert not (tmp_path / "checkpoint-2").exists()
    assert os.listdir(RootLayout(str(tmp_path)).staging) == []


def test_also_keep_protects_a_checkpoint_retention_would_delete(tmp_path: Path) -> None:
    mgr = ckptguard.CheckpointManager(tmp_path, keep_last=1)
    for step in (1, 2, 3):
        mgr.save_files(step, _writer(bytes([step])), also_keep={"checkpoint-1"})
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        ".ckptguard", "checkpoint-1", "checkpoint-3",
    ]  # fmt: skip
    mgr.save_files(4, _writer(b"4"))  # nothing kept on request any more: keep_last rules
    assert sorted(p.name for p in tmp_path.iterdir()) == [".ckptguard", "checkpoint-4"]
    mgr.wait()  # the retired checkpoints leave trash in the background
    assert os.listdir(RootLayout(str(tmp_path)).trash) == []


def test_a_manager_with_accelerate_naming(tmp_path: Path) -> None:
    mgr = ckptguard.CheckpointManager(tmp_path, keep_last=2, naming=ACCELERATE_NAMING)
    for i in range(3):
        mgr.save_files(i, _writer(bytes([i])))
    (tmp_path / "checkpoint-9").mkdir()  # another scheme's name: not this root's checkpoint
    assert [c.name for c in mgr.list()] == ["checkpoint_1", "checkpoint_2"]
    latest = mgr.latest()
    assert latest is not None
    assert latest.step == 2


def test_transaction_properties_need_a_started_transaction(tmp_path: Path) -> None:
    tx = AtomicCheckpoint(tmp_path / "checkpoint-1")
    with pytest.raises(RuntimeError, match="with statement"):
        _ = tx.staging_dir
    with tx as staging:
        assert tx.staging_dir == staging
        assert tx.shared  # one process: one committer
        (staging / "f").write_bytes(b"1")
    assert ckptguard.verify(tmp_path / "checkpoint-1").ok


def test_retire_checkpoint_leaves_nothing_half_deleted(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with ckptguard.atomic_checkpoint(tmp_path / "epoch=0-step=5.ckpt") as staging:
        (staging / "checkpoint.ckpt").write_bytes(b"z" * 1000)
    layout = RootLayout(str(tmp_path))
    assert retire_checkpoint(layout, "epoch=0-step=5.ckpt", storage=LocalStorage())
    assert not (tmp_path / "epoch=0-step=5.ckpt").exists()
    assert os.listdir(layout.trash) == []
    # Already gone (another process retired it): success at once, not retried as NFS lag.
    caplog.clear()
    assert retire_checkpoint(layout, "epoch=0-step=5.ckpt", storage=LocalStorage())
    assert not [r.getMessage() for r in caplog.records if "retry" in r.getMessage()]
