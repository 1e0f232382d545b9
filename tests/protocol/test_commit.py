from __future__ import annotations

import errno
import json
import os
import stat
import threading
from collections.abc import Mapping
from pathlib import Path
from typing import Any, cast

import pytest

import ckptguard
from ckptguard import Outcome
from ckptguard._format.layout import MANIFEST_NAME, RootLayout
from ckptguard._format.owner import WriterInfo
from ckptguard._protocol.locking import root_lock
from ckptguard._protocol.rename import commit, publish, seal, stage
from ckptguard._protocol.strategy import IfExists


def _save(
    path: Path,
    files: Mapping[str, bytes],
    *,
    if_exists: IfExists = "keep",
    metrics: Mapping[str, Any] | None = None,
) -> ckptguard.AtomicCheckpoint:
    tx = ckptguard.atomic_checkpoint(path, if_exists=if_exists, metrics=metrics)
    with tx as staging:
        for rel, data in files.items():
            (staging / rel).parent.mkdir(parents=True, exist_ok=True)
            (staging / rel).write_bytes(data)
    return tx


def _result(tx: ckptguard.AtomicCheckpoint) -> ckptguard.CommitResult:
    assert tx.result is not None
    return tx.result


def test_commit_writes_files_and_manifest(tmp_path: Path) -> None:
    root = tmp_path / "run"
    tx = ckptguard.atomic_checkpoint(
        root / "checkpoint-100", metrics={"eval_loss": 0.5}, metadata={"note": "hi"}
    )
    with tx as staging:
        # While writing: a private 0700 staging dir under a 0700 meta dir, invisible.
        assert stat.S_IMODE(os.stat(staging).st_mode) == 0o700
        assert stat.S_IMODE(os.stat(root / ".ckptguard").st_mode) == 0o700
        assert staging.parent == root / ".ckptguard" / "staging"
        assert not (root / "checkpoint-100").exists()
        (staging / "model.bin").write_bytes(b"m" * 1000)
        (staging / "opt").mkdir()
        (staging / "opt" / "state.json").write_text("{}")
    result = _result(tx)
    assert result.outcome == Outcome.COMMITTED
    assert result.path == str(root / "checkpoint-100")
    final = root / "checkpoint-100"
    assert sorted(os.listdir(final)) == sorted(["model.bin", "opt", MANIFEST_NAME])
    manifest = ckptguard.read_manifest(str(final))
    assert manifest.step == 100
    assert manifest.metrics == {"eval_loss": 0.5}
    assert manifest.metadata == {"note": "hi"}
    assert [(f.path, f.size) for f in manifest.files] == [
        ("model.bin", 1000),
        ("opt/state.json", 2),
    ]
    assert manifest.writer.pid == os.getpid()
    assert "python" in manifest.versions
    assert ckptguard.verify(final).ok
    assert os.listdir(root / ".ckptguard" / "staging") == []
    umask_mode = 0o777 & ~_umask()
    assert stat.S_IMODE(os.stat(final).st_mode) == umask_mode


def _umask() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("Umask:"):
            return int(line.split()[1], 8)
    raise AssertionError("no umask")


def test_exception_aborts_and_propagates(tmp_path: Path) -> None:
    root = tmp_path / "run"

    class Boom(Exception):
        pass

    with pytest.raises(Boom), ckptguard.atomic_checkpoint(root / "checkpoint-1") as staging:
        (staging / "half").write_bytes(b"x")
        raise Boom
    assert not (root / "checkpoint-1").exists()
    assert os.listdir(root / ".ckptguard" / "staging") == []


def test_permanent_oserror_in_user_code_becomes_typed(tmp_path: Path) -> None:
    root = tmp_path / "run"
    with (
        pytest.raises(ckptguard.StorageFull) as info,
        ckptguard.atomic_checkpoint(root / "checkpoint-1") as staging,
    ):
        (staging / "part").write_bytes(b"x" * 4096)
        raise OSError(errno.ENOSPC, "No space left on device")
    assert "4096 bytes were written" in str(info.value)
    assert "free" in str(info.value)
    assert info.value.bytes_needed == 4096
    assert isinstance(info.value.__cause__, OSError)
    assert os.listdir(root / ".ckptguard" / "staging") == []


def test_if_exists_keep_replace_error(tmp_path: Path) -> None:
    root = tmp_path / "run"
    _save(root / "checkpoint-1", {"a": b"first"})
    kept = _result(_save(root / "checkpoint-1", {"a": b"second"}))
    assert kept.outcome == Outcome.KEPT_EXISTING
    assert (root / "checkpoint-1" / "a").read_bytes() == b"first"

    with pytest.raises(ckptguard.CommitConflict) as info:
        _save(root / "checkpoint-1", {"a": b"third"}, if_exists="error")
    assert isinstance(info.value, FileExistsError)
    assert str(root / "checkpoint-1") in str(info.value)
    assert (root / "checkpoint-1" / "a").read_bytes() == b"first"

    replaced = _result(_save(root / "checkpoint-1", {"a": b"fourth"}, if_exists="replace"))
    assert replaced.outcome == Outcome.REPLACED
    assert (root / "checkpoint-1" / "a").read_bytes() == b"fourth"
    assert ckptguard.verify(root / "checkpoint-1").ok
    assert os.listdir(root / ".ckptguard" / "trash") == []
    assert os.listdir(root / ".ckptguard" / "staging") == []


def test_bad_if_exists_is_rejected_before_anything_happens(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="if_exists"):
        ckptguard.atomic_checkpoint(tmp_path / "checkpoint-1", if_exists=cast("Any", "overwrite"))
    assert not tmp_path.joinpath(".ckptguard").exists()


@pytest.mark.parametrize("damage", ["foreign", "corrupt", "bitrot", "file"])
def test_entry_in_the_way_is_quarantined_never_deleted(tmp_path: Path, damage: str) -> None:
    root = tmp_path / "run"
    target = root / "checkpoint-5"
    if damage == "foreign":  # e.g. a half-written folder from a tool without ckptguard
        target.mkdir(parents=True)
        (target / "pytorch_model.bin").write_bytes(b"half")
    elif damage == "corrupt":
        _save(target, {"a": b"abc"})
        (target / "a").write_bytes(b"abcd")  # size no longer matches the manifest
    elif damage == "bitrot":
        _save(target, {"a": b"abc"})
        (target / "a").write_bytes(b"abd")  # same size: only the checksum catches it
    else:
        root.mkdir(parents=True)
        target.write_bytes(b"a file, not a checkpoint")
    result = _result(_save(target, {"a": b"new"}))
    assert result.outcome == Outcome.COMMITTED
    assert result.quarantined is not None
    assert (target / "a").read_bytes() == b"new"
    moved = Path(result.quarantined)
    assert moved.parent == root / ".ckptguard" / "quarantine"
    assert moved.exists()
    note = json.loads(Path(str(moved) + ".json").read_text())
    assert note["original"] == str(target)
    assert note["reason"]


def test_refuses_symlinks_and_reserved_names(tmp_path: Path) -> None:
    root = tmp_path / "run"
    (tmp_path / "secret").write_bytes(b"s")
    with (
        pytest.raises(ckptguard.UnsupportedFile, match="symlink"),
        ckptguard.atomic_checkpoint(root / "checkpoint-1") as staging,
    ):
        (staging / "link").symlink_to(tmp_path / "secret")
    with (
        pytest.raises(ckptguard.UnsupportedFile, match="reserved"),
        ckptguard.atomic_checkpoint(root / "checkpoint-1") as staging,
    ):
        (staging / MANIFEST_NAME).write_text("{}")
    assert not (root / "checkpoint-1").exists()
    assert os.listdir(root / ".ckptguard" / "staging") == []


def test_invalid_metrics_fail_before_commit(tmp_path: Path) -> None:
    root = tmp_path / "run"
    with pytest.raises(ValueError, match="non-finite"):
        _save(root / "checkpoint-1", {"a": b"x"}, metrics={"loss": float("nan")})
    assert not (root / "checkpoint-1").exists()
    assert os.listdir(root / ".ckptguard" / "staging") == []


def test_same_save_committed_by_a_peer_is_success(tmp_path: Path) -> None:
    root = tmp_path / "run"
    first = stage(root, "checkpoint-7")
    Path(first.path, "a").write_bytes(b"x")
    manifest = seal(first)
    with root_lock(first.layout):
        assert commit(first, manifest).outcome == Outcome.COMMITTED
    # A peer of the same save (same save id) arrives second: success, exactly one copy.
    peer = stage(root, "checkpoint-7", save_id=first.save_id)
    Path(peer.path, "a").write_bytes(b"x")
    peer_manifest = seal(peer)
    with root_lock(peer.layout):
        result = commit(peer, peer_manifest)
        publish(peer, result)
    assert result.outcome == Outcome.ALREADY_COMMITTED
    assert result.manifest.save_id == first.save_id
    assert not os.path.exists(peer.path)
    assert sorted(os.listdir(root)) == [".ckptguard", "checkpoint-7"]


def test_threads_commit_exactly_once(tmp_path: Path) -> None:
    root = tmp_path / "run"
    barrier = threading.Barrier(8)
    outcomes: list[Outcome] = []
    errors: list[BaseException] = []

    def worker(i: int) -> None:
        try:
            barrier.wait()
            outcomes.append(_result(_save(root / "checkpoint-1", {"who": str(i).encode()})).outcome)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert sorted(outcomes) == sorted([Outcome.COMMITTED] + [Outcome.KEPT_EXISTING] * 7)
    assert ckptguard.verify(root / "checkpoint-1").ok
    assert os.listdir(root / ".ckptguard" / "staging") == []


def test_lock_timeout_aborts_cleanly(tmp_path: Path) -> None:
    root = tmp_path / "run"
    _save(root / "checkpoint-1", {"a": b"x"})
    with root_lock(RootLayout(str(root))):
        with (
            pytest.raises(ckptguard.LockTimeout) as info,
            ckptguard.atomic_checkpoint(root / "checkpoint-2", lock_timeout=0.1) as staging,
        ):
            (staging / "a").write_bytes(b"y")
        assert isinstance(info.value, TimeoutError)
    assert not (root / "checkpoint-2").exists()
    assert os.listdir(root / ".ckptguard" / "staging") == []


def test_next_save_removes_stale_staging_only(tmp_path: Path, dead_writer: WriterInfo) -> None:
    root = tmp_path / "run"
    dead = stage(root, "checkpoint-1", writer=dead_writer)
    Path(dead.path, "half").write_bytes(b"x")
    live = stage(root, "checkpoint-2")  # this process: alive
    foreign = root / ".ckptguard" / "staging" / "not-ours"
    foreign.mkdir()
    _save(root / "checkpoint-3", {"a": b"x"})
    left = sorted(os.listdir(root / ".ckptguard" / "staging"))
    assert left == sorted([os.path.basename(live.path), "not-ours"])
