"""Lightning through ``AtomicCheckpointIO``: training runs killed mid-save, and the plugin.

The runs are subprocesses of ``lightning_driver.py`` (3 epochs of 10 steps, a checkpoint
file ``ckpts/step=<n>.ckpt`` at each epoch's end), alone or under torchrun (DDP on gloo, 2
ranks). A run SIGKILLed inside ckptguard's file commit and run again must end with the
same weights, byte for byte, as a run never interrupted. The plugin's own contract (save,
replace, load, verify, remove, pick the newest valid) is tested in this process, for
checkpoint files and for the checkpoint directories earlier releases saved.
(test_lightning_files.py: real Trainers reading the files, the sidecar, crash points.)
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
import torch

import ckptguard
import driver_jobs
from ckptguard._coordination.base import SingleProcess
from ckptguard._errors import CommitConflict, CorruptCheckpoint, NoValidCheckpoint
from ckptguard._format.layout import RootLayout, save_id_writer
from ckptguard._protocol.filecommit import (
    parse_temp_name,
    read_sidecar,
    remove_stale_temps,
    sidecar_name,
    verify_file,
)
from ckptguard._protocol.transaction import AtomicCheckpoint
from ckptguard.integrations.lightning import (
    CHECKPOINT_FILE,
    AtomicCheckpointIO,
    checkpoint_file,
    last_valid_checkpoint,
)
from driver_jobs import Done, assert_killed

if TYPE_CHECKING:
    from collections.abc import Iterator

DRIVER = Path(__file__).with_name("lightning_driver.py")
PLUGIN_LOGGER = "ckptguard.integrations.lightning"


class Job(driver_jobs.Job):
    driver = DRIVER


def _run(out: Path, *args: str, nproc: int = 1) -> Done:
    return driver_jobs.finish(Job(out, *args, nproc=nproc))


def _names(root: Path) -> list[str]:
    """The checkpoints (and anything else) in ``root``, without hidden entries (sidecars,
    temp files, ckptguard's own folder)."""
    return sorted(p.name for p in root.iterdir() if not p.name.startswith("."))


def _entries(meta_dir: str) -> list[str]:
    return sorted(os.listdir(meta_dir)) if os.path.isdir(meta_dir) else []


def _assert_verifies(path: Path) -> ckptguard.VerifyReport:
    """A checkpoint file against its sidecar, a directory (earlier releases) its manifest."""
    report = ckptguard.verify(path) if path.is_dir() else verify_file(path)
    assert report.ok, report.problems
    return report


def _temps(root: Path) -> list[str]:
    return sorted(p.name for p in root.iterdir() if parse_temp_name(p.name) is not None)


def _temp_pid(name: str) -> int:
    parsed = parse_temp_name(name)
    assert parsed is not None
    writer = save_id_writer(parsed[1])
    assert writer is not None
    return writer[1]


def _assert_clean(root: Path, *, crashed_pid: int | None = None) -> None:
    """No save in progress or left by a crash, no replaced or deleted checkpoint pending.

    A killed save's temp file is removed by a later save once it is older than the grace
    for dead writers: until then it may linger (``crashed_pid``), and goes when aged.
    """
    layout = RootLayout(str(root))
    assert _entries(layout.staging) == []
    assert _entries(layout.trash) == []
    leftover = _temps(root)
    if crashed_pid is not None and leftover:
        assert {_temp_pid(name) for name in leftover} == {crashed_pid}, leftover
        for name in leftover:
            os.utime(root / name, (0, 0))  # older than any grace: its writer is gone
        remove_stale_temps(str(root))
        leftover = _temps(root)
    assert leftover == []


def _flip_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Job]:
    """One protected, uninterrupted run; started once, in the background."""
    job = Job(tmp_path_factory.mktemp("lightning") / "reference")
    yield job
    job.stop()


# -- training runs -------------------------------------------------------------------------
@pytest.mark.slow
def test_killed_before_the_rename_resumes_identically(tmp_path: Path, reference: Job) -> None:
    out = tmp_path / "run"
    ckpts = out / "ckpts"
    killed = _run(out, "--kill-at", "file.sidecar_written:2")
    assert_killed(killed, nproc=1)
    # The second save died with its sidecar written, before its rename: invisible.
    assert _names(ckpts) == ["step=10.ckpt"]
    assert _assert_verifies(ckpts / "step=10.ckpt").step == 10
    assert (ckpts / sidecar_name("step=20.ckpt")).exists()  # harmless: no file to describe
    crashed_pid = _temp_pid(_temps(ckpts)[0])

    resumed = _run(out).ok()
    assert resumed.resumed_from == "10"
    assert resumed.final == reference.wait().ok().final
    assert json.loads(resumed.final)["step"] == 30
    _assert_clean(ckpts, crashed_pid=crashed_pid)
    assert _names(ckpts) == ["step=10.ckpt", "step=20.ckpt", "step=30.ckpt"]
    for step in (10, 20, 30):
        assert _assert_verifies(ckpts / f"step={step}.ckpt").step == step


@pytest.mark.slow
def test_ddp_two_ranks_killed_mid_save_resume_identically(tmp_path: Path) -> None:
    """DDP on gloo: each rank sees half the data, so an epoch is 5 steps."""
    out = tmp_path / "run"
    ckpts = out / "ckpts"
    reference = Job(tmp_path / "reference", nproc=2)
    try:
        assert_killed(_run(out, "--kill-at", "file.sidecar_written:2", nproc=2), nproc=2)
        assert _names(ckpts) == ["step=5.ckpt"]
        _assert_verifies(ckpts / "step=5.ckpt")
        crashed_pid = _temp_pid(_temps(ckpts)[0])

        resumed = _run(out, nproc=2).ok()
        assert resumed.resumed_from == "5"
        assert resumed.final == reference.wait().ok().final
    finally:
        reference.stop()
    assert json.loads(resumed.final)["step"] == 15
    _assert_clean(ckpts, crashed_pid=crashed_pid)
    assert _names(ckpts) == ["step=10.ckpt", "step=15.ckpt", "step=5.ckpt"]
    for step in (5, 10, 15):
        _assert_verifies(ckpts / f"step={step}.ckpt")


@pytest.mark.slow
def test_top_k_rotation_deletes_through_the_plugin(tmp_path: Path, reference: Job) -> None:
    """save_top_k=1 on the training loss: each better epoch replaces the one kept before."""
    done = _run(tmp_path / "run", "--top-k", "1").ok()
    ckpts = done.out / "ckpts"
    # The loss falls every epoch here, so step=10 and step=20 were saved, then removed.
    assert _names(ckpts) == ["step=30.ckpt"]
    _assert_verifies(ckpts / "step=30.ckpt")
    _assert_clean(ckpts)
    assert done.final == reference.wait().ok().final  # logging the loss changes nothing


# -- the plugin, in this process -----------------------------------------------------------
def _state(step: int, value: float) -> dict[str, Any]:
    return {"global_step": step, "epoch": 0, "state_dict": {"w": torch.full((3, 4), value)}}


def _save(path: Path, step: int = 5, value: float = 1.0) -> None:
    AtomicCheckpointIO().save_checkpoint(_state(step, value), path)


def _save_directory_form(path: Path, step: int = 5, value: float = 1.0) -> None:
    """A checkpoint as earlier releases of the plugin saved it: a directory holding the
    torch.save file and the manifest (this is the code they ran)."""
    tx = AtomicCheckpoint(
        str(path),
        step=step,
        metadata={"framework": "lightning", "epoch": 0},
        if_exists="replace",
        coordinator=SingleProcess(),
    )
    with tx as staging:
        torch.save(_state(step, value), os.path.join(staging, CHECKPOINT_FILE))


def _w(loaded: dict[str, Any]) -> torch.Tensor:
    w: torch.Tensor = loaded["state_dict"]["w"]
    return w


def test_save_creates_a_verifying_file(tmp_path: Path) -> None:
    path = tmp_path / "step=5.ckpt"
    _save(path)
    assert path.is_file()
    assert sorted(os.listdir(tmp_path)) == [sidecar_name("step=5.ckpt"), "step=5.ckpt"]
    report = _assert_verifies(path)
    assert report.step == 5
    assert report.manifest is not None
    assert report.manifest.metadata["framework"] == "lightning"
    # The file is torch.save's own: torch.load reads it without ckptguard.
    assert torch.equal(_w(torch.load(path, weights_only=True)), torch.full((3, 4), 1.0))
    _assert_clean(tmp_path)


def test_saving_again_replaces_the_checkpoint(tmp_path: Path) -> None:
    path = tmp_path / "last.ckpt"
    _save(path, value=1.0)
    first = _assert_verifies(path).manifest
    _save(path, step=6, value=2.0)
    assert _names(tmp_path) == ["last.ckpt"]
    second = _assert_verifies(path).manifest
    assert first is not None
    assert second is not None
    assert second.save_id != first.save_id
    assert second.step == 6
    sidecar = read_sidecar(path)
    assert sidecar is not None
    assert sidecar.entries == (second,)  # trimmed to the new entry after the rename
    loaded = AtomicCheckpointIO().load_checkpoint(path)
    assert torch.equal(_w(loaded), torch.full((3, 4), 2.0))
    _assert_clean(tmp_path)


def test_load_returns_the_saved_dict(tmp_path: Path) -> None:
    path = tmp_path / "step=5.ckpt"
    _save(path, value=3.0)
    loaded = AtomicCheckpointIO().load_checkpoint(path)
    assert loaded["global_step"] == 5
    assert loaded["epoch"] == 0
    assert torch.equal(_w(loaded), torch.full((3, 4), 3.0))


def test_a_flipped_byte_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "step=5.ckpt"
    _save(path)
    _flip_byte(path)
    with pytest.raises(CorruptCheckpoint, match="sidecar") as info:
        AtomicCheckpointIO().load_checkpoint(path)
    assert info.value.path == str(path)
    with pytest.raises(CorruptCheckpoint):
        checkpoint_file(path)
    assert not verify_file(path).ok


def test_loading_a_missing_checkpoint_raises(tmp_path: Path) -> None:
    with pytest.raises(NoValidCheckpoint):
        AtomicCheckpointIO().load_checkpoint(tmp_path / "step=5.ckpt")


def test_remove_checkpoint_removes_the_file_and_its_sidecar(tmp_path: Path) -> None:
    path = tmp_path / "step=5.ckpt"
    _save(path)
    AtomicCheckpointIO().remove_checkpoint(path)
    assert sorted(os.listdir(tmp_path)) == []
    # A sidecar left without its file (by a crash between the two removals) goes too.
    _save(path)
    path.unlink()
    AtomicCheckpointIO().remove_checkpoint(path)
    assert sorted(os.listdir(tmp_path)) == []


def test_remove_checkpoint_removes_the_directory_form(tmp_path: Path) -> None:
    path = tmp_path / "step=5.ckpt"
    _save_directory_form(path)
    AtomicCheckpointIO().remove_checkpoint(path)
    assert _names(tmp_path) == []
    _assert_clean(tmp_path)  # retired through trash, and gone from there too


def test_remove_checkpoint_removes_plain_files_and_symlinks(tmp_path: Path) -> None:
    plain = tmp_path / "plain.ckpt"
    torch.save(_state(5, 1.0), plain)
    target = tmp_path / "step=5.ckpt"
    _save(target)
    link = tmp_path / "last.ckpt"
    link.symlink_to(target.name)
    io = AtomicCheckpointIO()
    io.remove_checkpoint(plain)
    io.remove_checkpoint(link)
    assert _names(tmp_path) == ["step=5.ckpt"]  # the link's target is left alone
    _assert_verifies(target)


def test_a_plain_torch_save_file_loads_with_a_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    plain = tmp_path / "old.ckpt"
    torch.save(_state(5, 4.0), plain)
    with caplog.at_level(logging.WARNING, logger=PLUGIN_LOGGER):
        loaded = AtomicCheckpointIO().load_checkpoint(plain)
    assert torch.equal(_w(loaded), torch.full((3, 4), 4.0))
    warned = [r for r in caplog.records if r.name == PLUGIN_LOGGER]
    assert [r.levelno for r in warned] == [logging.WARNING]
    assert "not saved by ckptguard" in warned[0].getMessage()
    assert "not checksummed" in warned[0].getMessage()
    assert checkpoint_file(plain) == str(plain)


def test_a_truncated_plain_file_is_refused(tmp_path: Path) -> None:
    plain = tmp_path / "old.ckpt"
    torch.save(_state(5, 4.0), plain)
    data = plain.read_bytes()
    plain.write_bytes(data[: len(data) - 100])
    with pytest.raises(CorruptCheckpoint, match="zip"):
        AtomicCheckpointIO().load_checkpoint(plain)


def test_last_valid_checkpoint_skips_corrupt_and_symlinks(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    assert last_valid_checkpoint(tmp_path / "absent") is None
    assert last_valid_checkpoint(tmp_path) is None
    for step in (10, 20, 30):
        _save(tmp_path / f"step={step}.ckpt", step=step)
    assert last_valid_checkpoint(tmp_path) == str(tmp_path / "step=30.ckpt")
    _flip_byte(tmp_path / "step=30.ckpt")
    # Same step as its target, and a name that sorts last: only skipping it makes it lose.
    (tmp_path / "zz-last.ckpt").symlink_to("step=20.ckpt")
    with caplog.at_level(logging.WARNING, logger=PLUGIN_LOGGER):
        assert last_valid_checkpoint(tmp_path) == str(tmp_path / "step=20.ckpt")
    skipped = [r.getMessage() for r in caplog.records if r.name == PLUGIN_LOGGER]
    assert any("step=30.ckpt" in m for m in skipped)
    assert not any("zz-last" in m for m in skipped)  # passed over before any verification


def test_last_valid_checkpoint_reads_both_forms(tmp_path: Path) -> None:
    _save_directory_form(tmp_path / "step=10.ckpt", step=10)
    _save(tmp_path / "step=20.ckpt", step=20)
    assert last_valid_checkpoint(tmp_path) == str(tmp_path / "step=20.ckpt")
    _save_directory_form(tmp_path / "step=30.ckpt", step=30)
    assert last_valid_checkpoint(tmp_path) == str(tmp_path / "step=30.ckpt")
    _flip_byte(tmp_path / "step=30.ckpt" / CHECKPOINT_FILE)
    assert last_valid_checkpoint(tmp_path) == str(tmp_path / "step=20.ckpt")


def test_the_directory_form_still_loads(tmp_path: Path) -> None:
    path = tmp_path / "step=5.ckpt"
    _save_directory_form(path, value=7.0)
    loaded = AtomicCheckpointIO().load_checkpoint(path)
    assert loaded["global_step"] == 5
    assert torch.equal(_w(loaded), torch.full((3, 4), 7.0))
    _flip_byte(path / CHECKPOINT_FILE)
    with pytest.raises(CorruptCheckpoint) as info:
        AtomicCheckpointIO().load_checkpoint(path)
    assert info.value.path == str(path)


def test_checkpoint_file_is_the_file_itself_or_the_inner_file(tmp_path: Path) -> None:
    path = tmp_path / "step=5.ckpt"
    _save(path)
    assert checkpoint_file(path) == str(path)
    old = tmp_path / "step=6.ckpt"
    _save_directory_form(old, step=6)
    assert checkpoint_file(old) == str(old / CHECKPOINT_FILE)
    (old / "extra.bin").write_bytes(b"not in the manifest")
    with pytest.raises(CorruptCheckpoint):
        checkpoint_file(old)


def test_saving_over_the_directory_form_replaces_it_with_a_file(tmp_path: Path) -> None:
    last = tmp_path / "last.ckpt"
    _save_directory_form(last, step=5, value=1.0)
    _save(last, step=6, value=2.0)
    assert last.is_file()
    assert _assert_verifies(last).step == 6
    assert torch.equal(_w(AtomicCheckpointIO().load_checkpoint(last)), torch.full((3, 4), 2.0))
    _assert_clean(tmp_path)


def test_a_foreign_directory_is_not_replaced(tmp_path: Path) -> None:
    path = tmp_path / "last.ckpt"
    path.mkdir()
    (path / "notes.txt").write_text("mine")
    with pytest.raises(CommitConflict):
        _save(path)
    assert (path / "notes.txt").read_text() == "mine"
    assert _temps(tmp_path) == []


def test_storage_options_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "step=5.ckpt"
    with pytest.raises(TypeError, match="storage_options"):
        AtomicCheckpointIO().save_checkpoint(_state(5, 1.0), path, storage_options={"x": 1})
    assert not path.exists()


_REPLACE_KILLED = """
import os, signal, sys, torch
from ckptguard._storage import faults as _faults
from ckptguard.integrations.lightning import AtomicCheckpointIO
path = sys.argv[1]
def hook(name):
    if name == "file.made_way":  # the old last.ckpt is in trash, the new not yet in
        os.kill(os.getpid(), signal.SIGKILL)
_faults.set_fault_hook(hook)
AtomicCheckpointIO().save_checkpoint({"global_step": 2, "w": torch.zeros(3)}, path)
"""


def test_a_replace_of_the_directory_form_killed_between_its_renames_still_loads_it(
    tmp_path: Path,
) -> None:
    """Killed after the old ``last.ckpt/`` went to trash and before the file was renamed in."""
    last = tmp_path / "last.ckpt"
    _save_directory_form(last, step=1, value=1.0)
    proc = subprocess.run(
        [sys.executable, "-c", _REPLACE_KILLED, str(last)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    assert not last.exists()  # the cut: nothing under the name
    assert last_valid_checkpoint(tmp_path) == str(last)  # repaired: the old one is back
    loaded = AtomicCheckpointIO().load_checkpoint(last)
    assert loaded["global_step"] == 1
    assert torch.equal(_w(loaded), torch.full((3, 4), 1.0))
    assert _entries(RootLayout(str(tmp_path)).trash) == []


def test_a_save_last_link_is_followed_inside_its_directory(tmp_path: Path) -> None:
    """``ModelCheckpoint(save_last="link")``: last.ckpt is a relative symlink to a checkpoint."""
    _save(tmp_path / "step=5.ckpt", step=5, value=2.0)
    (tmp_path / "last.ckpt").symlink_to("step=5.ckpt")
    loaded = AtomicCheckpointIO().load_checkpoint(tmp_path / "last.ckpt")
    assert loaded["global_step"] == 5
    assert torch.equal(_w(loaded), torch.full((3, 4), 2.0))
    assert checkpoint_file(tmp_path / "last.ckpt") == str(tmp_path / "step=5.ckpt")
    _save_directory_form(tmp_path / "step=4.ckpt", step=4)
    (tmp_path / "old-last.ckpt").symlink_to("step=4.ckpt")
    assert AtomicCheckpointIO().load_checkpoint(tmp_path / "old-last.ckpt")["global_step"] == 4
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    _save(outside / "step=9.ckpt", step=9)
    (tmp_path / "escape.ckpt").symlink_to(outside / "step=9.ckpt")
    with pytest.raises(CorruptCheckpoint, match="outside its directory"):
        AtomicCheckpointIO().load_checkpoint(tmp_path / "escape.ckpt")


def test_a_replace_of_the_directory_form_killed_after_its_rename_cleans_the_trash(
    tmp_path: Path,
) -> None:
    """Killed once the new file holds the name: the old directory in trash is removed."""
    last = tmp_path / "last.ckpt"
    _save_directory_form(last, step=1, value=1.0)
    killed = _REPLACE_KILLED.replace('"file.made_way"', '"file.renamed"')
    proc = subprocess.run(
        [sys.executable, "-c", killed, str(last)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    trash = RootLayout(str(tmp_path)).trash
    assert len(_entries(trash)) == 1  # the cut: the old directory waits in trash
    assert last_valid_checkpoint(tmp_path) == str(last)  # repair ran
    assert AtomicCheckpointIO().load_checkpoint(last)["global_step"] == 2  # the new file
    assert _entries(trash) == []  # a valid file holds the name: the old copy goes
