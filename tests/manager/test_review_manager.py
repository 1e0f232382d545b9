"""Defects found in the review of CheckpointManager, serialization and the CLI; each test
failed before its fix."""

from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
import sys
from pathlib import Path
from typing import cast

import pytest
import torch

import ckptguard
from ckptguard._format.layout import RETIRED_SUFFIX, RootLayout, new_save_id
from ckptguard._format.safetensors import parse_header
from ckptguard._manager.retention import RetentionPolicy
from ckptguard._state.serialization import TargetMismatch

CLI = Path(sys.executable).with_name("ckptguard")


def _cli(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(CLI), *map(str, args)], capture_output=True, text=True, timeout=120, check=False
    )


def _flip(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))


def test_clean_keeps_the_last_good_copy_when_the_checkpoint_is_corrupt(tmp_path: Path) -> None:
    mgr = ckptguard.CheckpointManager(tmp_path, keep_last=None)
    mgr.save(1, {"w": torch.ones(8)})
    good = Path(RootLayout(str(tmp_path)).trash) / f"checkpoint-1.{new_save_id()}"
    shutil.copytree(tmp_path / "checkpoint-1", good)  # a good copy left in trash ...
    _flip(tmp_path / "checkpoint-1" / "tensors.safetensors")  # ... and the checkpoint rots
    proc = _cli("clean", "--yes", "--json", tmp_path)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert [p["action"] for p in report["planned"]] == ["keep"]
    assert good.exists()
    assert ckptguard.verify(good).ok


def test_target_mismatch_is_not_corruption_and_never_falls_back(tmp_path: Path) -> None:
    mgr = ckptguard.CheckpointManager(tmp_path, keep_last=None)
    mgr.save(1, {"w": torch.zeros(2), "step": 1})
    mgr.save(2, {"w": [1, 2], "step": 2})
    with pytest.raises(TargetMismatch, match="holds a list"):
        mgr.restore(target={"w": torch.zeros(2)})
    assert not issubclass(TargetMismatch, ckptguard.CorruptCheckpoint)
    assert issubclass(TargetMismatch, ckptguard.CheckpointError)


def test_a_module_is_untouched_when_the_checkpoint_does_not_fit(tmp_path: Path) -> None:
    mgr = ckptguard.CheckpointManager(tmp_path)
    mgr.save(1, {"model": torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 2))})
    other = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 3))
    before = {k: v.clone() for k, v in other.state_dict().items()}
    with pytest.raises(TargetMismatch):
        mgr.restore(target={"model": other})
    after = other.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # nothing was copied


def test_a_conjugate_view_is_not_taken_for_its_base(tmp_path: Path) -> None:
    a = torch.tensor([1 + 2j, 3 - 4j], dtype=torch.complex64)
    mgr = ckptguard.CheckpointManager(tmp_path)
    mgr.save(1, {"a": a, "b": a.conj()})
    out = mgr.restore()
    assert torch.equal(out["a"], a)
    assert torch.equal(out["b"], a.conj().resolve_conj())


def test_an_empty_tensor_with_absurd_dimensions_is_rejected() -> None:
    header = json.dumps(
        {"x": {"dtype": "F32", "shape": [0, 2**62, 2**62], "data_offsets": [0, 0]}}
    ).encode()
    header += b" " * (-len(header) % 8)
    data = struct.pack("<Q", len(header)) + header
    with pytest.raises(ckptguard.CorruptCheckpoint, match="absurd"):
        parse_header(data, len(data), "x")


def test_retention_survives_huge_metrics_and_rejects_bad_policies(tmp_path: Path) -> None:
    mgr = ckptguard.CheckpointManager(tmp_path, keep_last=2, best_metric="loss")
    for step in range(1, 5):
        mgr.save(step, {"w": torch.zeros(1)}, metrics={"loss": 10**400})
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("checkpoint")) == [
        "checkpoint-3",
        "checkpoint-4",
    ]
    with pytest.raises(ValueError, match="keep_last"):
        RetentionPolicy(keep_last=cast("int", 2.5))


def test_a_flat_state_dict_is_one_file(tmp_path: Path) -> None:
    model = torch.nn.Sequential(*[torch.nn.Linear(4, 4) for _ in range(20)])
    mgr = ckptguard.CheckpointManager(tmp_path)
    info = mgr.save(1, model.state_dict())
    assert sorted(os.listdir(info.path)) == ["ckptguard.json", "state.json", "tensors.safetensors"]
    out = mgr.restore()
    assert all(torch.equal(out[k], v) for k, v in model.state_dict().items())


def test_clean_plans_retired_entries_as_removals_and_errors_stay_json(tmp_path: Path) -> None:
    mgr = ckptguard.CheckpointManager(tmp_path)
    mgr.save(1, {"w": torch.zeros(1)})
    retired = (
        Path(RootLayout(str(tmp_path)).trash) / f"checkpoint-1.{new_save_id()}{RETIRED_SUFFIX}"
    )
    os.rename(tmp_path / "checkpoint-1", retired)
    dry = json.loads(_cli("clean", "--json", tmp_path).stdout)
    assert [p["action"] for p in dry["planned"]] == ["remove"]
    trash = Path(RootLayout(str(tmp_path)).trash)
    for child in trash.iterdir():
        child.rename(tmp_path / child.name)
    trash.rmdir()
    trash.symlink_to(tmp_path)
    for command in ("list", "clean"):
        proc = _cli(command, "--json", tmp_path)
        assert proc.returncode == 2
        assert json.loads(proc.stdout)["ok"] is False
