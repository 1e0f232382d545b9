"""CheckpointManager end to end, on real files with small torch models.

Save/list/latest/verify/restore, retention after each save (keep_last, keep_best min and
max, keep_every, pins), failed saves that must not delete anything, corrupt and foreign
checkpoints that resume skips, startup repair of what a crash leaves, and a real
SIGKILL in the middle of a save.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import logging
import os
import signal
import subprocess
import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, cast

import pytest
import torch

import ckptguard
from ckptguard._format.layout import MANIFEST_NAME, RootLayout, new_save_id
from ckptguard._format.owner import WriterInfo, current_writer
from ckptguard._protocol.rename import stage


# -- helpers -----------------------------------------------------------------------------------
def _state(k: int) -> dict[str, Any]:
    """A small training state whose values depend on ``k`` only."""
    g = torch.Generator().manual_seed(k)
    model = torch.nn.Linear(4, 3)
    with torch.no_grad():
        model.weight.copy_(torch.randn(3, 4, generator=g))
        model.bias.copy_(torch.randn(3, generator=g))
    return {
        "model": model.state_dict(),
        "step": k,
        "lr": 0.1 * k,
        "counts": torch.arange(k, k + 5, dtype=torch.int64),
    }


def _assert_same(loaded: Any, expected: Any) -> None:
    if isinstance(expected, torch.Tensor):
        assert isinstance(loaded, torch.Tensor)
        assert loaded.dtype == expected.dtype
        assert loaded.shape == expected.shape
        assert torch.equal(loaded, expected)
    elif isinstance(expected, Mapping):
        assert isinstance(loaded, Mapping)
        assert set(loaded) == set(expected)
        for key, value in expected.items():
            _assert_same(loaded[key], value)
    else:
        assert loaded == expected


def _dirs(root: Path) -> set[str]:
    return {p.name for p in root.iterdir() if p.name.startswith("checkpoint-")}


def _names(*steps: int) -> set[str]:
    return {f"checkpoint-{s}" for s in steps}


def _assert_no_leftovers(root: Path) -> None:
    layout = RootLayout(str(root))
    for where in (layout.staging, layout.trash):
        assert not os.path.exists(where) or os.listdir(where) == [], where


def _flip_last_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))


def _dead_writer() -> WriterInfo:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return dataclasses.replace(current_writer(), pid=proc.pid, pid_start=1)


def _save_steps(
    mgr: ckptguard.CheckpointManager,
    steps: range | list[int],
    metrics: Callable[[int], Mapping[str, Any]] | None = None,
) -> None:
    for step in steps:
        mgr.save(step, _state(step), metrics=metrics(step) if metrics else None)
    mgr.wait()  # retired checkpoints leave trash in the background (issue 18)


# -- save / list / latest / verify / restore ---------------------------------------------------
def test_save_list_latest_verify_restore(tmp_path: Path) -> None:
    root = tmp_path / "run"
    mgr = ckptguard.CheckpointManager(root, keep_last=None)
    info = mgr.save(1, _state(1), metrics={"loss": 0.5}, metadata={"note": "first"}).result()
    assert info.step == 1
    assert info.valid
    assert not info.checksums_verified  # sizes and structure only (verify_after_save=False)
    assert info.path == str(root / "checkpoint-1")
    assert info.metrics == {"loss": 0.5}
    assert info.size_bytes > 0
    mgr.save(2, _state(2), metrics={"loss": 0.25})
    mgr.save(3, _state(3), metrics={"loss": torch.tensor(0.125)})  # a 0-d tensor metric

    listed = mgr.list()
    assert [c.step for c in listed] == [1, 2, 3]
    assert all(c.valid and c.size_bytes > 0 and c.files >= 2 for c in listed)
    assert [c.metrics["loss"] for c in listed] == [0.5, 0.25, 0.125]
    assert all(c.name == f"checkpoint-{c.step}" for c in listed)
    assert all(c.checksums_verified for c in mgr.list(checksums=True))

    latest = mgr.latest()
    assert latest is not None
    assert latest.step == 3
    report = mgr.verify()
    assert report.ok
    assert report.step == 3
    assert mgr.verify(step=1).ok

    _assert_same(mgr.restore(), _state(3))
    _assert_same(mgr.restore(step=1), _state(1))
    assert _dirs(root) == _names(1, 2, 3)
    manifest = ckptguard.read_manifest(str(root / "checkpoint-1"))
    assert manifest.metadata["note"] == "first"
    _assert_no_leftovers(root)


def test_restore_into_a_target_in_place(tmp_path: Path) -> None:
    mgr = ckptguard.CheckpointManager(tmp_path / "run")
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.randn(5, 4)).sum().backward()
    opt.step()
    saved = {k: v.clone() for k, v in model.state_dict().items()}
    mgr.save(7, {"model": model, "optimizer": opt})

    fresh = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    fresh_opt = torch.optim.SGD(fresh.parameters(), lr=0.1, momentum=0.9)
    weight = fresh[0].weight
    mgr.restore(target={"model": fresh, "optimizer": fresh_opt})
    assert fresh[0].weight is weight  # loaded in place
    for key, value in fresh.state_dict().items():
        assert torch.equal(value, saved[key]), key
    momentum = fresh_opt.state_dict()["state"][0]["momentum_buffer"]
    assert torch.equal(momentum, opt.state_dict()["state"][0]["momentum_buffer"])


# -- retention end to end ----------------------------------------------------------------------
def test_keep_last(tmp_path: Path) -> None:
    root = tmp_path / "run"
    mgr = ckptguard.CheckpointManager(root, keep_last=2)
    _save_steps(mgr, range(1, 6))
    assert _dirs(root) == _names(4, 5)
    assert [c.step for c in mgr.list()] == [4, 5]
    _assert_no_leftovers(root)


@pytest.mark.parametrize(
    ("mode", "values", "kept"),
    [
        ("min", [5.0, 1.0, 3.0, 4.0, 6.0], {2, 5}),
        ("max", [0.1, 0.9, 0.5, 0.2, 0.3], {2, 5}),
        ("max", [0.1, 0.2, 0.3, 0.4, 0.5], {5}),
    ],
)
def test_keep_best(tmp_path: Path, mode: str, values: list[float], kept: set[int]) -> None:
    root = tmp_path / "run"
    mgr = ckptguard.CheckpointManager(
        root, keep_last=1, keep_best=1, best_metric="m", best_mode="min" if mode == "min" else "max"
    )
    _save_steps(mgr, range(1, 6), metrics=lambda s: {"m": values[s - 1], "other": -s})
    assert _dirs(root) == {f"checkpoint-{s}" for s in kept}
    _assert_no_leftovers(root)


def test_keep_every(tmp_path: Path) -> None:
    root = tmp_path / "run"
    mgr = ckptguard.CheckpointManager(root, keep_last=1, keep_every=3)
    _save_steps(mgr, range(1, 8))
    assert _dirs(root) == _names(3, 6, 7)
    _assert_no_leftovers(root)


def test_pin_and_unpin(tmp_path: Path) -> None:
    root = tmp_path / "run"
    mgr = ckptguard.CheckpointManager(root, keep_last=1)
    mgr.save(1, _state(1))
    mgr.pin(1)
    mgr.pin(1)  # idempotent
    mgr.save(2, _state(2), pin=True)
    _save_steps(mgr, [3, 4])
    assert _dirs(root) == _names(1, 2, 4)
    assert {c.step: c.pinned for c in mgr.list()} == {1: True, 2: True, 4: False}

    mgr.unpin(1)
    mgr.unpin(2)  # saved with pin=True: stays pinned
    mgr.unpin(99)  # never pinned: nothing to do
    mgr.save(5, _state(5))
    assert _dirs(root) == _names(2, 5)
    mgr.wait()  # the retired checkpoints leave trash in the background
    _assert_no_leftovers(root)


def test_failed_save_deletes_nothing(tmp_path: Path) -> None:
    root = tmp_path / "run"
    _save_steps(ckptguard.CheckpointManager(root, keep_last=None), [1, 2, 3])
    mgr = ckptguard.CheckpointManager(root, keep_last=1)  # would delete 1, 2 and 3
    with pytest.raises(TypeError, match="object"):
        mgr.save(4, {"model": _state(4)["model"], "oops": object()})
    assert _dirs(root) == _names(1, 2, 3)
    assert all(c.valid for c in mgr.list(checksums=True))
    _assert_no_leftovers(root)
    with pytest.raises(ValueError, match="step"):
        mgr.save(-1, _state(1))
    with pytest.raises(ValueError, match="reserved"):
        mgr.save(5, _state(5), metadata={"ckptguard": 1})
    assert _dirs(root) == _names(1, 2, 3)
    _assert_no_leftovers(root)


def test_non_finite_metrics_are_stored_as_strings_and_never_best(tmp_path: Path) -> None:
    root = tmp_path / "run"
    mgr = ckptguard.CheckpointManager(root, keep_last=1, keep_best=1, best_metric="loss")
    losses = {1: 2.0, 2: float("-inf"), 3: float("nan"), 4: float("inf"), 5: 3.0}
    _save_steps(mgr, range(1, 6), metrics=lambda s: {"loss": losses[s]})
    # Step 2's -inf would win a numeric "min": it is a string, so step 1 is the best.
    assert _dirs(root) == _names(1, 5)

    other = ckptguard.CheckpointManager(tmp_path / "other", keep_last=None)
    info = other.save(
        1, _state(1), metrics={"a": float("nan"), "b": float("inf"), "c": 1.5}
    ).result()
    assert info.metrics == {"a": "nan", "b": "inf", "c": 1.5}
    assert other.list()[0].metrics == {"a": "nan", "b": "inf", "c": 1.5}


# -- corrupt and foreign checkpoints -----------------------------------------------------------
def test_latest_and_restore_skip_a_corrupt_newest(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    root = tmp_path / "run"
    mgr = ckptguard.CheckpointManager(root, keep_last=None)
    _save_steps(mgr, [1, 2])
    bad = root / "checkpoint-2"
    _flip_last_byte(bad / "model.safetensors")

    with caplog.at_level(logging.WARNING, logger="ckptguard"):
        latest = mgr.latest()
    assert latest is not None
    assert latest.step == 1
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert any(
        str(bad) in r.getMessage() and "checksum mismatch" in r.getMessage() for r in warnings
    ), [r.getMessage() for r in warnings]

    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="ckptguard"):
        _assert_same(mgr.restore(), _state(1))
    assert any(str(bad) in r.getMessage() for r in caplog.records)
    with pytest.raises(ckptguard.CorruptCheckpoint):
        mgr.restore(step=2)
    assert not mgr.verify().ok  # the newest, valid or not
    assert {c.step: c.valid for c in mgr.list(checksums=True)} == {1: True, 2: False}
    assert _dirs(root) == _names(1, 2)  # nothing deleted


def test_foreign_checkpoint_folder_is_never_used_nor_deleted(tmp_path: Path) -> None:
    root = tmp_path / "run"
    foreign = root / "checkpoint-50"  # a Trainer crashed while writing it
    foreign.mkdir(parents=True)
    (foreign / "model.safetensors").write_bytes(b"half written")
    (foreign / "trainer_state.json").write_text("{}")

    mgr = ckptguard.CheckpointManager(root, keep_last=1)
    _save_steps(mgr, [1, 2, 3])
    assert _dirs(root) == _names(3, 50)
    assert sorted(p.name for p in foreign.iterdir()) == ["model.safetensors", "trainer_state.json"]
    assert (foreign / "model.safetensors").read_bytes() == b"half written"

    latest = mgr.latest()
    assert latest is not None
    assert latest.step == 3
    _assert_same(mgr.restore(), _state(3))
    with pytest.raises(ckptguard.CorruptCheckpoint):
        mgr.restore(step=50)
    assert {c.step: c.valid for c in mgr.list()} == {3: True, 50: False}
    _assert_no_leftovers(root)


def test_resave_replaces_an_existing_step(tmp_path: Path) -> None:
    root = tmp_path / "run"
    mgr = ckptguard.CheckpointManager(root)
    mgr.save(1, _state(1))
    first = ckptguard.read_manifest(str(root / "checkpoint-1")).save_id
    info = mgr.save(1, _state(2)).result()
    assert info.save_id != first
    assert _dirs(root) == _names(1)
    _assert_same(mgr.restore(step=1), _state(2))
    _assert_no_leftovers(root)


# -- startup repair ----------------------------------------------------------------------------
def test_startup_repairs_stale_staging_and_an_interrupted_replace(tmp_path: Path) -> None:
    root = tmp_path / "run"
    _save_steps(ckptguard.CheckpointManager(root, keep_last=None), [1, 2])
    layout = RootLayout(str(root))
    stale = stage(root, "checkpoint-3", writer=_dead_writer())
    Path(stale.path, "model.safetensors").write_bytes(b"partial")
    # A replace cut between its renames: the old checkpoint in trash, the final name gone.
    trashed = Path(layout.trash, f"checkpoint-2.{new_save_id()}")
    os.rename(root / "checkpoint-2", trashed)
    assert _dirs(root) == _names(1)

    mgr = ckptguard.CheckpointManager(root, keep_last=None)
    assert _dirs(root) == _names(1, 2)
    assert not os.path.exists(stale.path)
    assert not trashed.exists()
    _assert_no_leftovers(root)
    _assert_same(mgr.restore(), _state(2))


# -- errors ------------------------------------------------------------------------------------
def test_missing_step_and_empty_root(tmp_path: Path) -> None:
    mgr = ckptguard.CheckpointManager(tmp_path / "run")
    assert mgr.latest() is None
    assert mgr.list() == []
    with pytest.raises(ckptguard.NoValidCheckpoint):
        mgr.restore()
    with pytest.raises(ckptguard.NoValidCheckpoint):
        mgr.verify()
    mgr.save(1, _state(1))
    with pytest.raises(ckptguard.CheckpointNotFound, match="checkpoint-7"):
        mgr.restore(step=7)
    with pytest.raises(ckptguard.CheckpointNotFound):
        mgr.verify(step=7)
    # Both are also the builtin they resemble.
    assert issubclass(ckptguard.CheckpointNotFound, FileNotFoundError)
    assert issubclass(ckptguard.NoValidCheckpoint, ckptguard.CheckpointError)


def test_url_roots_never_litter_the_working_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)  # a regression must not create "memory:" folders here
    mgr = ckptguard.CheckpointManager(f"memory://ckptguard-tests/{tmp_path.name}")
    mgr.save(1, _state(1))
    assert mgr.verify(1).ok
    assert os.listdir(tmp_path) == []


def test_a_url_whose_filesystem_is_not_installed_says_what_to_install(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ImportError, match="gcsfs"):  # not a dependency of this project
        ckptguard.CheckpointManager("gs://bucket/prefix/run")
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("verify_after_save", [True, False])
def test_verify_after_save_reads_the_new_checkpoint_back_before_retention(
    tmp_path: Path, verify_after_save: bool
) -> None:
    """Bytes that change between the seal and the read-back (a bad disk, a bug) are caught
    with verify_after_save=True, and retention then keeps the older checkpoint; the
    default does not read the save back (the False case is the control)."""
    from ckptguard._storage import faults as _faults

    root = tmp_path / "run"
    mgr = ckptguard.CheckpointManager(root, keep_last=1, verify_after_save=verify_after_save)
    mgr.save(1, _state(1))

    def flip(name: str) -> None:
        if name == "publish.done":
            victim = root / "checkpoint-2" / "model.safetensors"
            data = bytearray(victim.read_bytes())
            data[-1] ^= 0xFF
            victim.write_bytes(bytes(data))

    previous = _faults.set_fault_hook(flip)
    try:
        if verify_after_save:
            with pytest.raises(ckptguard.CorruptCheckpoint, match="right after its commit"):
                mgr.save(2, _state(2))
            assert (root / "checkpoint-1").exists()  # nothing deleted on its strength
        else:
            info = mgr.save(2, _state(2)).result()
            assert info.valid
            assert not info.checksums_verified
            assert not (root / "checkpoint-1").exists()
    finally:
        _faults.set_fault_hook(previous)
    assert not ckptguard.verify(root / "checkpoint-2").ok  # a restore would skip it


# -- a real SIGKILL in the middle of a save ----------------------------------------------------
CRASH_CHILD = '''
"""Saves make_state(1..3) with CheckpointManager; SIGKILLs itself at a fault point."""
import os
import signal
import sys

import torch

import ckptguard
from ckptguard._storage.faults import set_fault_hook


def make_state(k):
    g = torch.Generator().manual_seed(1000 + k)
    return {
        "w": torch.randn(64, 48, generator=g),
        "h": torch.randn(33, generator=g).to(torch.bfloat16),
        "ids": torch.randint(0, 1 << 40, (17,), generator=g),
        "mask": torch.rand(9, generator=g) > 0.5,
        "k": k,
    }


def main():
    root, point, nth, marker, steps = sys.argv[1:6]
    seen = []

    def hook(name):
        if name == point:
            seen.append(name)
            if len(seen) == int(nth):
                with open(marker, "w") as f:
                    f.write(name)
                os.kill(os.getpid(), signal.SIGKILL)

    set_fault_hook(hook)
    mgr = ckptguard.CheckpointManager(root, keep_last=None)
    for k, step in enumerate(steps.split(","), start=1):
        mgr.save(int(step), make_state(k))
    sys.exit(3)


if __name__ == "__main__":
    main()
'''


@pytest.mark.parametrize(
    ("point", "nth", "steps", "expect_k"),
    [
        # (fault point, kill at its nth hit, steps saved, which save must be restored)
        ("seal.files_synced", 3, "1,2,3", 2),
        ("commit.before_rename", 3, "1,2,3", 2),
        ("commit.renamed", 3, "1,2,3", 3),  # renamed into place: the 3rd save is committed
        ("commit.moved_to_trash", 1, "1,2,2", 2),  # re-save of step 2 cut mid-replace
    ],
)
def test_sigkill_during_a_save(
    tmp_path: Path, point: str, nth: int, steps: str, expect_k: int
) -> None:
    expect_step = int(steps.split(",")[expect_k - 1])
    script = tmp_path / "crash_child_manager.py"
    script.write_text(CRASH_CHILD)
    root, marker = tmp_path / "run", tmp_path / "marker"
    proc = subprocess.run(
        [sys.executable, str(script), str(root), point, str(nth), str(marker), steps],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    assert marker.read_text() == point  # the fault point was really reached

    spec = importlib.util.spec_from_file_location("crash_child_manager", script)
    assert spec is not None
    assert spec.loader is not None
    child = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(child)
    make_state = cast("Callable[[int], dict[str, Any]]", child.make_state)

    mgr = ckptguard.CheckpointManager(root, keep_last=None)
    _assert_no_leftovers(root)  # the dead writer's staging and trash are repaired
    latest = mgr.latest()
    assert latest is not None
    assert latest.step == expect_step
    restored = mgr.restore()
    expected = make_state(expect_k)
    assert set(restored) == set(expected)
    assert restored["k"] == expect_k
    for key in ("w", "h", "ids", "mask"):
        got, want = restored[key], expected[key]
        assert got.dtype == want.dtype
        assert got.shape == want.shape
        # bit-exact: compare raw bytes, not values
        assert got.contiguous().view(torch.uint8).tolist() == want.view(torch.uint8).tolist()
    assert all(c.valid for c in mgr.list(checksums=True))
    assert MANIFEST_NAME in os.listdir(root / f"checkpoint-{expect_step}")
    # The run goes on: the next save works and leaves nothing behind.
    mgr.save(4, make_state(4))
    _assert_no_leftovers(root)


def test_retention_never_deletes_the_save_it_just_made_nor_trusts_bit_rot(tmp_path: Path) -> None:
    """Found in review: sizes-only checks let a bit-rotted higher step evict good saves."""
    import torch

    mgr = ckptguard.CheckpointManager(tmp_path, keep_last=1)
    mgr.save(10, {"w": torch.ones(1000)})
    rotten = tmp_path / "checkpoint-10" / "tensors.safetensors"
    data = bytearray(rotten.read_bytes())
    data[-1] ^= 0xFF  # same size: only a checksum notices
    rotten.write_bytes(bytes(data))
    info = mgr.save(1, {"w": torch.zeros(1000)})
    assert Path(info.path).exists()
    assert ckptguard.verify(info.path).ok
    assert (tmp_path / "checkpoint-10").exists()  # never deleted by retention: not valid
    latest = mgr.latest()
    assert latest is not None
    assert latest.step == 1
