"""Read-only roots, ``ckptguard.load``, and managing checkpoints by hand (best, delete).

The read-only root is a real read-only bind mount (``unshare -rm``, then ``mount --bind``
and ``remount,bind,ro``): the kernel refuses every write with EROFS, so any lock, probe
or recovery write on the read path fails the test.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import ckptguard

READER = textwrap.dedent(
    """
    import json, subprocess, sys
    import torch
    import ckptguard
    root = sys.argv[1]
    out = {}
    try:
        open(root + "/probe", "w")
    except OSError as exc:
        out["mount_refuses_writes"] = exc.errno
    mgr = ckptguard.CheckpointManager(root)
    out["read_only"] = mgr.read_only
    out["steps"] = [i.step for i in mgr.list()]
    out["latest"] = mgr.latest().step
    out["restored"] = mgr.restore()["w"].tolist()
    out["restored_1"] = mgr.restore(1)["w"].tolist()
    try:
        mgr.save(3, {"w": torch.zeros(2)})
    except ckptguard.ReadOnlyStorage as exc:
        out["save"] = str(exc)
    mgr.close()
    out["load"] = ckptguard.load(root)["w"].tolist()
    out["load_path"] = ckptguard.load(root + "/checkpoint-1")["w"].tolist()
    cli = [sys.executable, "-m", "ckptguard"]
    for args in (["list", root], ["verify", root + "/checkpoint-2"],
                 ["inspect", root + "/checkpoint-2"]):
        proc = subprocess.run(cli + args, capture_output=True, text=True)
        out[args[0]] = [proc.returncode, proc.stdout + proc.stderr]
    print(json.dumps(out))
    """
)


def _read_only_prefix(tmp_path: Path) -> list[str]:
    """A command prefix that runs its command with ``$1`` bind-mounted read-only."""
    unshare = shutil.which("unshare")
    assert unshare is not None, "unshare (util-linux) is needed for the read-only mount"
    script = 'mount --bind "$1" "$1" && mount -o remount,bind,ro "$1" && shift && exec "$@"'
    tmp_path.mkdir()
    for prefix in ([unshare, "-rm"], [unshare, "-m"]):
        probe = [*prefix, "sh", "-c", script, "sh", str(tmp_path), "true"]
        if subprocess.run(probe, capture_output=True, check=False, timeout=60).returncode == 0:
            return [*prefix, "sh", "-c", script, "sh"]
    pytest.fail("cannot make a read-only bind mount here (unshare -rm / -m both failed)")


def test_a_read_only_mount_lists_verifies_and_restores(tmp_path: Path) -> None:
    root = tmp_path / "run"
    mgr = ckptguard.CheckpointManager(root, check_environment=False)
    mgr.save(1, {"w": torch.ones(2)})
    mgr.save(2, {"w": torch.full((2,), 2.0)})
    mgr.close()
    # What a crash left: start-up recovery would remove it, which needs writes.
    leftover = root / ".ckptguard" / "staging" / "checkpoint-3.20260101T000000000000Z-dead"
    leftover.mkdir(parents=True)
    prefix = _read_only_prefix(tmp_path / "probe")
    proc = subprocess.run(
        [*prefix, str(root), sys.executable, "-c", READER, str(root)],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["mount_refuses_writes"] == 30  # EROFS: the mount really is read-only
    assert out["read_only"] is True
    assert out["steps"] == [1, 2]
    assert out["latest"] == 2
    assert out["restored"] == [2.0, 2.0]
    assert out["restored_1"] == [1.0, 1.0]
    assert "cannot save" in out["save"]
    assert "read-only mount" in out["save"]
    assert out["load"] == [2.0, 2.0]
    assert out["load_path"] == [1.0, 1.0]
    for command in ("list", "verify", "inspect"):
        code, text = out[command]
        assert code == 0, (command, text)
        assert "Read-only file system" not in text, (command, text)
    assert leftover.is_dir()  # nothing was written or removed


def test_read_only_by_choice_writes_nothing(tmp_path: Path) -> None:
    """``read_only=True`` on a writable root: no lock, no recovery, no run hold."""
    root = tmp_path / "run"
    mgr = ckptguard.CheckpointManager(root, check_environment=False)
    mgr.save(5, {"w": torch.ones(1)})
    mgr.close()
    leftover = root / ".ckptguard" / "staging" / "checkpoint-6.20260101T000000000000Z-dead"
    leftover.mkdir(parents=True)
    before = sorted(str(p.relative_to(root)) for p in root.rglob("*"))
    reader = ckptguard.CheckpointManager(root, read_only=True, check_environment=False)
    assert reader.restore()["w"].tolist() == [1.0]
    with pytest.raises(ckptguard.ReadOnlyStorage, match="read_only=True"):
        reader.save(6, {"w": torch.ones(1)})
    with pytest.raises(ckptguard.ReadOnlyStorage):
        reader.pin(5)
    with pytest.raises(ckptguard.ReadOnlyStorage):
        reader.delete(5, force=True)
    reader.close()
    assert sorted(str(p.relative_to(root)) for p in root.rglob("*")) == before


def test_a_reader_is_not_refused_beside_a_live_run(tmp_path: Path) -> None:
    """An evaluation job reads the checkpoints of a run that is training right now."""
    root = tmp_path / "run"
    code = textwrap.dedent(
        f"""
        import sys, torch, ckptguard
        mgr = ckptguard.CheckpointManager({str(root)!r}, check_environment=False)
        mgr.save(1, {{"w": torch.ones(1)}})
        print("saved", flush=True)
        sys.stdin.readline()
        mgr.close()
        """
    )
    with subprocess.Popen(
        [sys.executable, "-c", code],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        start_new_session=True,  # another job (process group) holding the run
    ) as trainer:
        assert trainer.stdin is not None
        assert trainer.stdout is not None
        try:
            assert trainer.stdout.readline().strip() == "saved"
            with pytest.raises(ckptguard.ForeignRun):  # a writer is refused...
                ckptguard.CheckpointManager(root, check_environment=False)
            reader = ckptguard.CheckpointManager(root, read_only=True, check_environment=False)
            assert reader.restore()["w"].tolist() == [1.0]  # ...a reader is not
            reader.close()
            assert ckptguard.load(root)["w"].tolist() == [1.0]
        finally:
            trainer.stdin.write("\n")
            trainer.stdin.close()
            trainer.wait(timeout=60)


def test_load_reports_what_it_cannot_load(tmp_path: Path) -> None:
    root = tmp_path / "run"
    root.mkdir()
    with pytest.raises(ckptguard.NoValidCheckpoint):
        ckptguard.load(root)
    mgr = ckptguard.CheckpointManager(root, check_environment=False)
    info = mgr.save(1, {"w": torch.ones(4)})
    mgr.close()
    weights = next(p for p in Path(info.path).iterdir() if p.suffix == ".safetensors")
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(ckptguard.CorruptCheckpoint):
        ckptguard.load(info.path)
    with pytest.raises(ckptguard.NoValidCheckpoint):
        ckptguard.load(root)
    with pytest.raises(ValueError, match="step=1 is for a root"):
        ckptguard.load(info.path, step=1)


def test_load_into_a_target(tmp_path: Path) -> None:
    model = torch.nn.Linear(3, 2)
    mgr = ckptguard.CheckpointManager(tmp_path / "run", check_environment=False)
    mgr.save(7, {"model": model})
    mgr.close()
    fresh = torch.nn.Linear(3, 2)
    ckptguard.load(tmp_path / "run", {"model": fresh})
    assert torch.equal(fresh.weight, model.weight)


def _losses(mgr: ckptguard.CheckpointManager, losses: dict[int, float]) -> None:
    for step, loss in losses.items():
        mgr.save(step, {"w": torch.full((1,), float(step))}, metrics={"loss": loss})


def test_best_and_delete_refusals(tmp_path: Path) -> None:
    mgr = ckptguard.CheckpointManager(
        tmp_path / "run", keep_last=None, best_metric="loss", check_environment=False
    )
    assert mgr.best() is None
    _losses(mgr, {1: 5.0, 2: 1.0, 3: 3.0, 4: 1.0, 5: 4.0})
    best = mgr.best()
    assert best is not None
    assert best.step == 4  # a tie goes to the newer checkpoint
    assert [i.step for i in mgr.list() if i.best] == [4]
    with pytest.raises(ckptguard.ProtectedCheckpoint, match="the best checkpoint by loss"):
        mgr.delete(4)
    with pytest.raises(ckptguard.ProtectedCheckpoint, match="newest valid"):
        mgr.delete(5)
    mgr.pin(3)
    with pytest.raises(ckptguard.ProtectedCheckpoint, match="pinned"):
        mgr.delete(3)
    with pytest.raises(ckptguard.CheckpointNotFound):
        mgr.delete(9)
    assert mgr.delete(1).endswith("checkpoint-1")
    assert mgr.delete(3, force=True).endswith("checkpoint-3")
    assert [i.step for i in mgr.list()] == [2, 4, 5]
    assert not (tmp_path / "run" / ".ckptguard" / "pins" / "checkpoint-3").exists()
    mgr.delete(4, force=True)
    best = mgr.best()
    assert best is not None
    assert best.step == 2
    mgr.close()
    # A tool without the manager's arguments ranks by what the saves recorded.
    from ckptguard._manager.admin import Admin
    from ckptguard._protocol.backend import backend_for

    admin = Admin(backend_for(tmp_path / "run"))
    best = admin.best()
    assert best is not None
    assert best.step == 2
    assert best.ranked_by == ("loss", "min")


def test_best_with_max_mode_and_no_metric(tmp_path: Path) -> None:
    mgr = ckptguard.CheckpointManager(
        tmp_path / "run", keep_last=None, best_metric="acc", best_mode="max",
        check_environment=False,
    )  # fmt: skip
    _losses(mgr, {1: 0.5})  # no "acc" metric at all
    assert mgr.best() is None
    mgr.save(2, {"w": torch.ones(1)}, metrics={"acc": 0.7})
    mgr.save(3, {"w": torch.ones(1)}, metrics={"acc": 0.9})
    mgr.save(4, {"w": torch.ones(1)}, metrics={"acc": 0.8})
    best = mgr.best()
    assert best is not None
    assert best.step == 3
    assert mgr.delete(1).endswith("checkpoint-1")  # no metric: not the best
    mgr.close()
