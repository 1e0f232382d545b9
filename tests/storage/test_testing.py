"""ckptguard.testing, the public fault-injection toolkit: each fault does what it says."""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

import ckptguard
from ckptguard._storage.base import Storage
from ckptguard._storage.faults import FAULT_POINTS
from ckptguard.testing import (
    OPERATIONS,
    Fault,
    FaultyStorage,
    PowerCut,
    cut_power_at,
    flip_bit,
    kill_at,
    on_step,
    truncate,
)


def _p(path: Path) -> str:
    return str(path)


def test_it_is_a_storage_and_rejects_bad_faults() -> None:
    assert isinstance(FaultyStorage(), Storage)
    with pytest.raises(ValueError, match="unknown operation"):
        Fault(op="fsync", at=1)
    with pytest.raises(ValueError, match="at=K"):
        Fault(op="exists")
    with pytest.raises(ValueError, match="counted from 1"):
        Fault(op="exists", at=0)
    assert "write" in OPERATIONS
    assert "close" in OPERATIONS


def test_fail_at_the_kth_matching_call_once_or_persistently(tmp_path: Path) -> None:
    fs = FaultyStorage(faults=[Fault.fail("exists", errno.EBUSY, at=3)])
    results: list[bool | int | None] = []
    for _ in range(5):
        try:
            results.append(fs.exists(_p(tmp_path)))
        except OSError as exc:
            results.append(exc.errno)
    assert results == [True, True, errno.EBUSY, True, True]
    assert [(call, op) for call, op, _, _ in fs.fired] == [(3, "exists")]

    fs = FaultyStorage(faults=[Fault.fail("list_dir", errno.EIO, at=2, times=None)])
    fs.list_dir(_p(tmp_path))
    for _ in range(3):
        with pytest.raises(OSError, match="injected") as info:
            fs.list_dir(_p(tmp_path))
        assert info.value.errno == errno.EIO
    fs.exists(_p(tmp_path))  # other operations are not affected
    assert fs.calls == 5


def test_path_pattern_and_several_operations(tmp_path: Path) -> None:
    (tmp_path / "a").mkdir()
    fault = Fault(ops=("exists", "list_dir"), path="*/a", errno=errno.ESTALE, at=1, times=None)
    fs = FaultyStorage(faults=[fault])
    assert fs.exists(_p(tmp_path))
    with pytest.raises(OSError, match="Stale"):
        fs.list_dir(_p(tmp_path / "a"))
    with pytest.raises(OSError, match="Stale"):
        fs.exists(_p(tmp_path / "a"))


def test_probability_is_seeded_and_near_p(tmp_path: Path) -> None:
    def run(seed: int) -> list[int]:
        fs = FaultyStorage(faults=[Fault.flaky((errno.EBUSY, errno.EAGAIN), 0.05)], seed=seed)
        codes = set()
        for _ in range(4000):
            try:
                fs.exists(_p(tmp_path))
            except OSError as exc:
                codes.add(exc.errno)
        assert codes == {errno.EBUSY, errno.EAGAIN}
        return [call for call, *_ in fs.fired]

    first = run(7)
    assert first == run(7)
    assert first != run(8)
    assert 120 < len(first) < 280  # 4000 x 0.05 = 200


def _dead(fs: FaultyStorage) -> bool:
    return fs.dead


def test_power_cut_stops_everything_until_power_loss(tmp_path: Path) -> None:
    fs = FaultyStorage(track=tmp_path, faults=[Fault.power_cut(at=2)])
    fs.make_dir(_p(tmp_path / "d"))
    with pytest.raises(PowerCut):
        fs.make_dir(_p(tmp_path / "e"))
    assert _dead(fs)
    with pytest.raises(PowerCut, match="power is off"):
        fs.exists(_p(tmp_path))
    fs.power_loss()
    assert not _dead(fs)
    # "d" was never made durable (its parent was not fsynced): the power loss dropped it.
    assert not (tmp_path / "d").exists()
    assert fs.exists(_p(tmp_path))


def test_durability_model_files_and_names(tmp_path: Path) -> None:
    (tmp_path / "old.txt").write_bytes(b"there before")  # the start counts as durable
    fs = FaultyStorage(track=tmp_path)
    root = _p(tmp_path)
    fs.write_bytes(f"{root}/unsynced", b"u", fsync=False)
    fs.write_bytes(f"{root}/synced-no-dir", b"s", fsync=True)
    fs.make_dir(f"{root}/dir")
    fs.write_bytes(f"{root}/dir/data", b"d", fsync=False)  # name durable below, data never
    fs.write_bytes(f"{root}/both", b"b", fsync=True)
    fs.fsync_dir(f"{root}/dir")
    fs.fsync_dir(root)
    fs.write_bytes(f"{root}/after", b"a", fsync=True)  # its name is not durable
    with open(f"{root}/both", "ab") as f:
        f.write(b" and more, unsynced")
    fs.power_loss()
    assert sorted(os.listdir(root)) == ["both", "dir", "old.txt", "synced-no-dir", "unsynced"]
    assert (tmp_path / "both").read_bytes() == b"b"
    assert (tmp_path / "dir" / "data").read_bytes() == b""  # never fsynced: empty
    assert (tmp_path / "unsynced").read_bytes() == b""
    assert (tmp_path / "synced-no-dir").read_bytes() == b"s"
    assert (tmp_path / "old.txt").read_bytes() == b"there before"


def test_durability_model_renames_and_removals(tmp_path: Path) -> None:
    root = _p(tmp_path)
    for name in ("a", "b", "c"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "f").write_bytes(name.encode())
    fs = FaultyStorage(track=tmp_path)
    fs.rename_noreplace(f"{root}/a", f"{root}/a2")  # not fsynced: undone
    fs.rename_noreplace(f"{root}/b", f"{root}/c/b")
    fs.remove_tree(f"{root}/c/f")
    fs.fsync_dir(f"{root}/c")  # the new name is durable, and so is the old (root unsynced)
    fs.power_loss()
    assert sorted(os.listdir(root)) == ["a", "b", "c"]
    assert (tmp_path / "a" / "f").read_bytes() == b"a"
    assert sorted(os.listdir(tmp_path / "c")) == ["b"]  # c/f's removal was durable
    assert (tmp_path / "c" / "b" / "f").read_bytes() == b"b"
    assert (tmp_path / "b" / "f").read_bytes() == b"b"  # a rename half made durable


def test_ignore_fsync_loses_a_committed_checkpoint(tmp_path: Path) -> None:
    for skip, survives in ((False, True), (True, False)):
        root = tmp_path / f"skip-{skip}"
        fs = FaultyStorage(track=root, ignore_fsync=skip)
        with ckptguard.CheckpointManager(root, storage=fs, check_environment=False) as mgr:
            mgr.save(1, {"w": np.arange(4.0)})
        fs.power_loss()
        with ckptguard.CheckpointManager(root, check_environment=False) as mgr:
            assert (mgr.latest() is not None) is survives


def test_cut_power_at_a_step_then_recover(tmp_path: Path) -> None:
    fs = FaultyStorage(track=tmp_path)
    mgr = ckptguard.CheckpointManager(tmp_path, storage=fs, check_environment=False)
    mgr.save(1, {"w": np.arange(4.0)})
    with cut_power_at("commit.renamed", fs) as reached, pytest.raises(PowerCut):
        mgr.save(2, {"w": np.arange(5.0)})
    assert reached == ["commit.renamed"]
    fs.power_loss()
    with ckptguard.CheckpointManager(tmp_path, check_environment=False) as fresh:
        # Renamed but the root never fsynced: checkpoint-2 is gone, checkpoint-1 is intact.
        assert [i.step for i in fresh.list()] == [1]
        assert np.array_equal(fresh.restore()["w"], np.arange(4.0))


def test_on_step_sees_every_local_step_in_order(tmp_path: Path) -> None:
    seen: list[str] = []
    with on_step(seen.append):
        ckptguard.CheckpointManager(tmp_path, check_environment=False).save(1, {"x": 1})
    expected = [p for p in FAULT_POINTS if p not in {"commit.quarantined", "commit.moved_to_trash"}]
    assert seen == expected
    with pytest.raises(ValueError, match="unknown protocol step"):
        kill_at("commit.rename").__enter__()


def _child(tmp_path: Path, body: str) -> subprocess.CompletedProcess[str]:
    script = tmp_path / "child.py"
    script.write_text(textwrap.dedent(body))
    return subprocess.run(
        [sys.executable, str(script), str(tmp_path / "root")],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_kill_at_a_named_step_kills_there(tmp_path: Path) -> None:
    proc = _child(
        tmp_path,
        """
        import sys, ckptguard
        from ckptguard.testing import kill_at
        mgr = ckptguard.CheckpointManager(sys.argv[1], check_environment=False)
        mgr.save(1, {"x": 1})
        with kill_at("seal.done"):
            mgr.save(2, {"x": 2})
        print("survived")
        """,
    )
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    assert "survived" not in proc.stdout
    root = tmp_path / "root"
    assert sorted(p.name for p in root.iterdir()) == [".ckptguard", "checkpoint-1"]
    assert len(list((root / ".ckptguard" / "staging").iterdir())) == 1  # sealed, not renamed


def test_tear_writes_half_a_chunk_then_kills(tmp_path: Path) -> None:
    proc = _child(
        tmp_path,
        """
        import os, sys
        from ckptguard.testing import Fault, FaultyStorage
        os.makedirs(sys.argv[1])
        fs = FaultyStorage(faults=[Fault.tear(at=2)])
        w = fs.open_write(os.path.join(sys.argv[1], "f"), fsync=False)
        w.write(b"a" * 100)
        w.write(b"b" * 100)
        print("survived")
        """,
    )
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    assert (tmp_path / "root" / "f").read_bytes() == b"a" * 100 + b"b" * 50


def test_kill_at_the_kth_operation(tmp_path: Path) -> None:
    proc = _child(
        tmp_path,
        """
        import sys
        from ckptguard.testing import Fault, FaultyStorage
        fs = FaultyStorage(faults=[Fault.kill(at=3, op="exists")])
        for i in range(5):
            fs.exists(sys.argv[1])
            print(i, flush=True)
        """,
    )
    assert proc.returncode == -signal.SIGKILL
    assert proc.stdout.split() == ["0", "1"]


def test_flip_bit_and_truncate(tmp_path: Path) -> None:
    f = tmp_path / "f"
    f.write_bytes(bytes(64))
    index = flip_bit(f, seed=3)
    data = f.read_bytes()
    assert sum(b.bit_count() for b in data) == 1
    assert data[index // 8] == 1 << (index % 8)
    assert flip_bit(f, index) == index
    assert f.read_bytes() == bytes(64)
    assert truncate(f, 10) == 10
    assert f.stat().st_size == 10
    assert 0 <= truncate(f, seed=1) < 10
    (tmp_path / "empty").touch()
    with pytest.raises(ValueError, match="empty"):
        flip_bit(tmp_path / "empty")
