"""Lightning checkpoints stay files: real Trainers, the checksum sidecar, crash points.

Trainer tests fit a tiny model for a couple of 10-step epochs on CPU in this process and
read what ``AtomicCheckpointIO`` saved the way users do: ``load_from_checkpoint``,
``torch.load``, a Trainer without the plugin. The file commit (``_protocol/filecommit.py``) is
crashed at each of its steps (in this process: a BaseException from the fault hook, which
stops the save where a kill would, and once for real with SIGKILL); after each crash the
name holds the old file or the new one, and it verifies.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import subprocess
import sys
import time
import warnings
import zipfile
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO

import lightning as L  # noqa: N812 - Lightning's own convention
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

import ckptguard
from ckptguard._errors import CorruptCheckpoint, UnsafeManifest
from ckptguard._format.layout import new_save_id
from ckptguard._protocol.filecommit import (
    FILE_FAULT_POINTS,
    commit_file,
    parse_temp_name,
    read_sidecar,
    remove_file,
    remove_stale_temps,
    sidecar_name,
    sidecar_path,
    temp_name,
    verify_file,
)
from ckptguard._storage import faults
from ckptguard.integrations.lightning import (
    AtomicCheckpointIO,
    checkpoint_file,
    last_valid_checkpoint,
)

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator

PLUGIN_LOGGER = "ckptguard.integrations.lightning"


# -- tiny Lightning runs -------------------------------------------------------------------
class Tiny(L.LightningModule):
    def __init__(self, width: int = 16) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.net = torch.nn.Sequential(
            torch.nn.Linear(8, width), torch.nn.ReLU(), torch.nn.Linear(width, 1)
        )

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:  # noqa: ARG002
        x, y = batch
        loss = torch.nn.functional.mse_loss(self.net(x), y)
        self.log("train_loss", loss)
        return loss

    def configure_optimizers(self) -> Any:
        return torch.optim.AdamW(self.parameters(), lr=1e-2)


def _data() -> torch.utils.data.DataLoader[Any]:
    g = torch.Generator().manual_seed(7)
    x = torch.randn(80, 8, generator=g)  # 10 steps an epoch
    ds = torch.utils.data.TensorDataset(x, x.sum(dim=1, keepdim=True))
    return torch.utils.data.DataLoader(ds, batch_size=8, shuffle=False)


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Lightning's advice (few workers, no logger...) is not under test here."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def _fit(
    ckpts: Path,
    *,
    epochs: int,
    plugin: bool = True,
    resume: str | None = None,
    **checkpointing: Any,
) -> tuple[L.Trainer, Tiny]:
    """Fit ``Tiny`` for ``epochs`` epochs of 10 steps, a checkpoint at each epoch's end."""
    callback = ModelCheckpoint(
        dirpath=ckpts, every_n_epochs=1, **{"save_top_k": -1, **checkpointing}
    )
    with _quiet():
        L.seed_everything(0, verbose=False)
        trainer = L.Trainer(
            max_epochs=epochs,
            accelerator="cpu",
            devices=1,
            plugins=[AtomicCheckpointIO()] if plugin else [],
            callbacks=[callback],
            logger=False,
            enable_progress_bar=False,
            enable_model_summary=False,
        )
        model = Tiny()
        trainer.fit(model, train_dataloaders=_data(), ckpt_path=resume)
    return trainer, model


def _weights_equal(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def _flip_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def _visible(root: Path) -> list[str]:
    return sorted(p.name for p in root.iterdir() if not p.name.startswith("."))


# -- what users do with the files ----------------------------------------------------------
def test_best_model_path_loads_with_load_from_checkpoint_and_torch_load(tmp_path: Path) -> None:
    trainer, model = _fit(tmp_path, epochs=2, save_top_k=1, monitor="train_loss", mode="min")
    callback = trainer.checkpoint_callback
    assert isinstance(callback, ModelCheckpoint)
    best = Path(callback.best_model_path)
    assert best.is_file()  # not a directory: IsADirectoryError before
    assert _visible(tmp_path) == ["epoch=1-step=20.ckpt"]  # rotation removed epoch 0's
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == [
        sidecar_name("epoch=1-step=20.ckpt")
    ]
    with _quiet():
        loaded = Tiny.load_from_checkpoint(best)
    assert _weights_equal(loaded, model)
    raw = torch.load(best, weights_only=False)
    assert raw["global_step"] == 20
    report = verify_file(best)
    assert report.ok, report.problems
    assert report.step == 20


def test_a_trainer_without_the_plugin_resumes_from_a_file_saved_with_it(tmp_path: Path) -> None:
    first = tmp_path / "first"
    _fit(first, epochs=1)
    saved = first / "epoch=0-step=10.ckpt"
    assert verify_file(saved).ok
    trainer, _ = _fit(tmp_path / "second", epochs=2, plugin=False, resume=str(saved))
    assert trainer.global_step == 20  # resumed at step 10, one more epoch


def test_a_flipped_byte_makes_the_plugin_refuse_to_resume(tmp_path: Path) -> None:
    _fit(tmp_path, epochs=1)
    saved = tmp_path / "epoch=0-step=10.ckpt"
    _flip_byte(saved)
    with pytest.raises(CorruptCheckpoint, match="sidecar"):
        _fit(tmp_path / "again", epochs=2, resume=str(saved))
    with pytest.raises(CorruptCheckpoint):
        AtomicCheckpointIO().load_checkpoint(saved)
    assert last_valid_checkpoint(tmp_path) is None  # and it is never picked to resume from


def test_save_last_link(tmp_path: Path) -> None:
    _fit(tmp_path, epochs=2, save_last="link")
    last = tmp_path / "last.ckpt"
    assert last.is_symlink()
    assert os.readlink(last) == "epoch=1-step=20.ckpt"
    assert _visible(tmp_path) == ["epoch=0-step=10.ckpt", "epoch=1-step=20.ckpt", "last.ckpt"]
    assert torch.load(last, weights_only=False)["global_step"] == 20
    assert AtomicCheckpointIO().load_checkpoint(last)["global_step"] == 20
    assert checkpoint_file(last) == str(tmp_path / "epoch=1-step=20.ckpt")
    assert last_valid_checkpoint(tmp_path) == str(tmp_path / "epoch=1-step=20.ckpt")
    trainer, _ = _fit(tmp_path, epochs=3, save_last="link", resume=str(last))
    assert trainer.global_step == 30
    assert os.readlink(last) == "epoch=2-step=30.ckpt"


def test_save_last_copy(tmp_path: Path) -> None:
    _fit(tmp_path, epochs=2, save_last=True)
    last = tmp_path / "last.ckpt"
    assert last.is_file()
    assert not last.is_symlink()
    report = verify_file(last)
    assert report.ok, report.problems
    assert report.step == 20
    sidecar = read_sidecar(last)
    assert sidecar is not None
    assert len(sidecar.entries) == 1  # replaced at epoch 1, then trimmed
    # Both hold step 20; whichever is returned, it verifies and resumes at step 20.
    newest = last_valid_checkpoint(tmp_path)
    assert newest in {str(last), str(tmp_path / "epoch=1-step=20.ckpt")}
    trainer, _ = _fit(tmp_path, epochs=3, save_last=True, resume=str(last))
    assert trainer.global_step == 30
    assert verify_file(last).step == 30


# -- adopting checkpoints written without ckptguard ----------------------------------------
def test_plain_lightning_checkpoints_are_adopted_newest_first(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    _fit(tmp_path, epochs=3, plugin=False)
    names = ["epoch=0-step=10.ckpt", "epoch=1-step=20.ckpt", "epoch=2-step=30.ckpt"]
    assert _visible(tmp_path) == names
    with caplog.at_level(logging.WARNING, logger=PLUGIN_LOGGER):
        assert last_valid_checkpoint(tmp_path) == str(tmp_path / names[2])
    warned = [r.getMessage() for r in caplog.records if r.name == PLUGIN_LOGGER]
    assert len(warned) == 1
    assert names[2] in warned[0]
    assert "not checksummed" in warned[0]

    # A truncated file (a save cut short without ckptguard) is skipped, with a warning.
    newest = tmp_path / names[2]
    newest.write_bytes(newest.read_bytes()[:-200])
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger=PLUGIN_LOGGER):
        assert last_valid_checkpoint(tmp_path) == str(tmp_path / names[1])
    warned = [r.getMessage() for r in caplog.records if r.name == PLUGIN_LOGGER]
    assert any(names[2] in m and "zip" in m for m in warned)

    # The plugin resumes from the adopted file (a warning: it was not checksummed).
    trainer, _ = _fit(tmp_path / "resumed", epochs=3, resume=last_valid_checkpoint(tmp_path))
    assert trainer.global_step == 30


def _plain(path: Path, step: int, mtime: float) -> None:
    torch.save({"global_step": step, "state_dict": {}}, path)
    os.utime(path, (mtime, mtime))


def test_the_order_of_plain_and_verified_checkpoints(tmp_path: Path) -> None:
    """Step first (sidecar, manifest or ``step=N`` in the name); a plain file without a
    step in its name goes just after the newest stepped one that is no newer than it."""
    AtomicCheckpointIO().save_checkpoint({"global_step": 20}, tmp_path / "verified.ckpt")
    saved_at = os.stat(tmp_path / "verified.ckpt").st_mtime
    _plain(tmp_path / "step=10.ckpt", 10, saved_at + 100)  # newer file, older step
    assert last_valid_checkpoint(tmp_path) == str(tmp_path / "verified.ckpt")
    _plain(tmp_path / "step=20.ckpt", 20, saved_at + 100)  # same step: verified wins
    assert last_valid_checkpoint(tmp_path) == str(tmp_path / "verified.ckpt")
    _plain(tmp_path / "last.ckpt", 25, saved_at - 100)  # no step in its name, and older
    assert last_valid_checkpoint(tmp_path) == str(tmp_path / "verified.ckpt")
    os.utime(tmp_path / "last.ckpt", (saved_at + 200, saved_at + 200))  # written after
    assert last_valid_checkpoint(tmp_path) == str(tmp_path / "last.ckpt")
    _plain(tmp_path / "step=30.ckpt", 30, saved_at + 300)
    assert last_valid_checkpoint(tmp_path) == str(tmp_path / "step=30.ckpt")
    (tmp_path / "notes.txt").write_text("not a checkpoint")
    (tmp_path / "hparams.yaml").write_text("width: 16\n")
    assert last_valid_checkpoint(tmp_path) == str(tmp_path / "step=30.ckpt")


# -- crashes in the file commit -----------------------------------------------------------
class _Crash(BaseException):
    """Stops a save where a SIGKILL would (``except Exception`` cleanup does not run)."""


@contextlib.contextmanager
def _crash_at(point: str, reached: set[str] | None = None) -> Iterator[None]:
    def hook(name: str) -> None:
        if reached is not None:
            reached.add(name)
        if name == point:
            raise _Crash(name)

    previous = faults.set_fault_hook(hook)
    try:
        with contextlib.suppress(_Crash):
            yield
    finally:
        faults.set_fault_hook(previous)


def _zip_writer(payload: bytes) -> Callable[[BinaryIO], None]:
    """A torch.save-shaped file (a zip holding data.pkl), torch-free."""

    def write(f: BinaryIO) -> None:
        with zipfile.ZipFile(f, "w") as archive:
            archive.writestr("archive/data.pkl", payload)

    return write


def _payload(path: Path) -> bytes:
    with zipfile.ZipFile(path) as archive:
        return archive.read("archive/data.pkl")


def _make_way_into(aside: Path) -> Callable[[str], None]:
    def make_way(path: str) -> None:
        os.rename(path, aside)

    return make_way


@pytest.mark.parametrize("point", FILE_FAULT_POINTS[:-1])  # "file.removed": removal, below
@pytest.mark.parametrize("before", ["nothing", "saved", "plain", "link", "directory"])
def test_a_save_crashed_at_any_step_leaves_the_old_or_the_new_file_verifying(
    tmp_path: Path, point: str, before: str
) -> None:
    path = tmp_path / "last.ckpt"
    if before == "saved":
        commit_file(path, _zip_writer(b"old"), step=1)
    elif before == "plain":  # written without ckptguard: adopted by the replace
        with path.open("wb") as f:
            _zip_writer(b"old")(f)
    elif before == "link":
        commit_file(tmp_path / "step=1.ckpt", _zip_writer(b"old"), step=1)
        path.symlink_to("step=1.ckpt")
    elif before == "directory":
        path.mkdir()
    make_way = _make_way_into(tmp_path / "aside") if before == "directory" else None
    reached: set[str] = set()
    with _crash_at(point, reached):
        commit_file(path, _zip_writer(b"new"), step=2, make_way=make_way)
    if point == "file.made_way" and before != "directory":
        assert point not in reached  # only a directory in the way is moved aside
    else:
        assert point in reached

    if not path.exists() or path.is_dir():  # the save was cut before its rename
        assert before in {"nothing", "directory"}
        assert point in {"file.written", "file.sidecar_written", "file.made_way"}
        return
    target = path.resolve()
    report = verify_file(target)
    if before == "plain" and point == "file.written":  # cut before anything changed
        assert report.extra["sidecar"] is None  # still a file written without ckptguard
        assert report.extra["structure"] is None  # that loads, as before
        assert _payload(target) == b"old"
    elif _payload(target) == b"new":
        assert report.ok, report.problems
        assert report.step == 2
    else:
        assert report.ok, report.problems
        assert _payload(target) == b"old"
        assert point in {"file.written", "file.sidecar_written"}
        assert report.step == (None if before == "plain" else 1)
        assert report.extra["adopted"] is (before == "plain")

    # The next save of the name succeeds, and leaves a one-entry sidecar.
    commit_file(path, _zip_writer(b"newer"), step=3)
    assert _payload(path) == b"newer"
    assert verify_file(path).step == 3
    sidecar = read_sidecar(path)
    assert sidecar is not None
    assert len(sidecar.entries) == 1


def test_every_file_fault_point_is_reached(tmp_path: Path) -> None:
    reached: set[str] = set()
    with _crash_at("none", reached):
        (tmp_path / "d.ckpt").mkdir()
        commit_file(
            tmp_path / "d.ckpt",
            _zip_writer(b"x"),
            step=1,
            make_way=_make_way_into(tmp_path / "aside"),
        )
        remove_file(tmp_path / "d.ckpt")
    assert reached == set(FILE_FAULT_POINTS)


def test_a_removal_crashed_between_file_and_sidecar_leaves_harmless_garbage(
    tmp_path: Path,
) -> None:
    path = tmp_path / "step=1.ckpt"
    commit_file(path, _zip_writer(b"old"), step=1)
    with _crash_at("file.removed"):
        remove_file(path)
    assert not path.exists()
    assert Path(sidecar_path(path)).exists()  # a sidecar without its file: never loaded
    assert last_valid_checkpoint(tmp_path) is None
    commit_file(path, _zip_writer(b"new"), step=2)  # the name is saved again: overwritten
    assert verify_file(path).step == 2


_KILLED_BEFORE_RENAME = """
import os, signal, sys, torch
from ckptguard._storage import faults
from ckptguard.integrations.lightning import AtomicCheckpointIO
path = sys.argv[1]
AtomicCheckpointIO().save_checkpoint({"global_step": 1, "w": torch.ones(3)}, path)
def hook(name):
    if name == "file.sidecar_written":  # the new sidecar is durable, the file not renamed
        os.kill(os.getpid(), signal.SIGKILL)
faults.set_fault_hook(hook)
AtomicCheckpointIO().save_checkpoint({"global_step": 2, "w": torch.zeros(3)}, path)
"""


def test_killed_between_sidecar_and_rename_the_old_checkpoint_loads_and_verifies(
    tmp_path: Path,
) -> None:
    last = tmp_path / "last.ckpt"
    proc = subprocess.run(
        [sys.executable, "-c", _KILLED_BEFORE_RENAME, str(last)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    sidecar = read_sidecar(last)
    assert sidecar is not None
    assert [e.step for e in sidecar.entries] == [2, 1]  # describes the new and the old
    report = verify_file(last)
    assert report.ok, report.problems
    assert report.step == 1
    loaded = AtomicCheckpointIO().load_checkpoint(last)
    assert loaded["global_step"] == 1
    assert torch.equal(loaded["w"], torch.ones(3))
    assert torch.load(last, weights_only=True)["global_step"] == 1
    assert last_valid_checkpoint(tmp_path) == str(last)
    temps = [p for p in tmp_path.iterdir() if parse_temp_name(p.name)]
    assert len(temps) == 1  # the killed save's file, never renamed

    # The next save replaces it and trims the sidecar; the dead writer's temp goes once
    # it is older than the grace given to writers that may still be starting.
    os.utime(temps[0], (0, 0))
    AtomicCheckpointIO().save_checkpoint({"global_step": 3, "w": torch.full((3,), 3.0)}, last)
    assert verify_file(last).step == 3
    sidecar = read_sidecar(last)
    assert sidecar is not None
    assert len(sidecar.entries) == 1
    assert _visible(tmp_path) == ["last.ckpt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == [sidecar_name("last.ckpt"), "last.ckpt"]


# -- the sidecar ---------------------------------------------------------------------------
def test_lightning_never_takes_a_sidecar_or_temp_file_for_a_checkpoint() -> None:
    callback = ModelCheckpoint()
    for name in (sidecar_name("last.ckpt"), temp_name("last.ckpt", new_save_id())):
        assert name.startswith(".")
        assert not name.endswith(callback.FILE_EXTENSION)


def test_an_altered_sidecar_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "step=1.ckpt"
    commit_file(path, _zip_writer(b"x"), step=1)
    where = Path(sidecar_path(path))
    good = where.read_bytes()
    for bad in (
        good.replace(b'"step": 1', b'"step": 9'),  # the entry's self-checksum
        good.replace(b'"file": "step=1.ckpt"', b'"file": "step=2.ckpt"'),
        good.replace(b"\n ", b"\n  ", 1),  # same content, other bytes
        good[: len(good) // 2],  # torn
        b"[]",
    ):
        where.write_bytes(bad)
        with pytest.raises(UnsafeManifest):
            read_sidecar(path)
        report = verify_file(path)
        assert not report.ok
        with pytest.raises(CorruptCheckpoint):
            checkpoint_file(path)
    where.unlink()
    where.symlink_to(tmp_path / "elsewhere.json")
    assert not verify_file(path).ok


def test_a_sidecar_for_another_file_is_refused(tmp_path: Path) -> None:
    one, two = tmp_path / "step=1.ckpt", tmp_path / "step=2.ckpt"
    commit_file(one, _zip_writer(b"one"), step=1)
    commit_file(two, _zip_writer(b"two"), step=2)
    os.replace(sidecar_path(one), sidecar_path(two))
    report = verify_file(two)
    assert not report.ok
    assert "written for step=1.ckpt" in report.problems[0]


def test_stale_temps_of_dead_writers_are_removed_and_live_ones_kept(tmp_path: Path) -> None:
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)  # fmt: skip
    ours = new_save_id()
    time_part, host, pid, rand = ours.split("-")
    theirs = f"{time_part}-{host}-{int(dead.stdout)}-{rand}"
    elsewhere = f"{time_part}-{'0' if host != '0' * 8 else '1'}{host[1:]}-{pid}-{rand}"
    minute_ago = time.time() - 60
    cases = {  # name: (save id, mtime, removed)
        "dead.ckpt": (theirs, minute_ago, True),  # its writer is gone from this host
        "starting.ckpt": (theirs, None, False),  # too recent to judge
        "live.ckpt": (ours, minute_ago, False),  # this process
        "other-host.ckpt": (elsewhere, minute_ago, False),  # cannot tell: kept for a while
        "other-host-old.ckpt": (elsewhere, 0.0, True),  # unchanged for stale_after
    }
    for name, (save_id, mtime, _) in cases.items():
        path = tmp_path / temp_name(name, save_id)
        path.write_bytes(b"partial")
        if mtime is not None:
            os.utime(path, (mtime, mtime))
    (tmp_path / ".not-ours.tmp").write_bytes(b"")
    removed = remove_stale_temps(str(tmp_path))
    expected = [str(tmp_path / temp_name(n, c[0])) for n, c in cases.items() if c[2]]
    assert sorted(removed) == sorted(expected)
    kept = [temp_name(n, c[0]) for n, c in cases.items() if not c[2]]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([*kept, ".not-ours.tmp"])


_TORCH_FREE = """
import sys, zipfile
sys.modules["torch"] = None  # any "import torch" now raises ImportError
from ckptguard._protocol.filecommit import commit_file, verify_file
def write(f):
    with zipfile.ZipFile(f, "w") as archive:
        archive.writestr("archive/data.pkl", b"x")
commit_file(sys.argv[1], write, step=7)
report = verify_file(sys.argv[1])
assert report.ok and report.step == 7, report.problems
assert "torch" not in [m for m in sys.modules if sys.modules[m] is not None]
"""


def test_the_sidecar_module_needs_no_torch(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-c", _TORCH_FREE, str(tmp_path / "step=7.ckpt")],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr


def test_the_public_verify_checks_a_file_against_its_sidecar(tmp_path: Path) -> None:
    path = tmp_path / "epoch=0-step=5.ckpt"
    AtomicCheckpointIO().save_checkpoint({"global_step": 5, "state_dict": {}}, str(path))
    report = ckptguard.verify(path)
    assert report.ok, report.problems
    assert report.step == 5
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    assert not ckptguard.verify(path).ok
    assert ckptguard.verify(path, checksums=False).ok  # same size: only checksums tell


def test_the_cli_lists_and_verifies_single_file_checkpoints(tmp_path: Path) -> None:
    """One row per name: the saved file, last.ckpt linking to it, a plain file."""
    from click.testing import CliRunner

    from ckptguard._tools.cli import main

    saved = tmp_path / "epoch=0-step=5.ckpt"
    AtomicCheckpointIO().save_checkpoint({"global_step": 5, "state_dict": {}}, str(saved))
    (tmp_path / "last.ckpt").symlink_to(saved.name)
    torch.save({"global_step": 1}, tmp_path / "plain.ckpt")
    listed = CliRunner().invoke(main, ["list", str(tmp_path), "--json"])
    assert listed.exit_code == 0, listed.output
    rows = {r["name"]: r for r in json.loads(listed.stdout)["checkpoints"]}
    assert set(rows) == {"epoch=0-step=5.ckpt", "last.ckpt", "plain.ckpt"}  # no sidecars
    assert rows["epoch=0-step=5.ckpt"]["status"] == "ok (sizes)"
    assert rows["epoch=0-step=5.ckpt"]["step"] == 5
    assert rows["last.ckpt"]["status"] == "ok (sizes) (link to epoch=0-step=5.ckpt)"
    assert rows["plain.ckpt"]["status"] == "no sidecar"
    assert rows["plain.ckpt"]["problems"][0]["severity"] == "warning"
    verified = CliRunner().invoke(main, ["verify", str(saved)])
    assert verified.exit_code == 0, verified.output
    assert verified.stdout.startswith("ok ")
    data = bytearray(saved.read_bytes())
    data[len(data) // 2] ^= 0xFF
    saved.write_bytes(bytes(data))
    verified = CliRunner().invoke(main, ["verify", str(saved), "--json"])
    assert verified.exit_code == 1
    (report,) = json.loads(verified.stdout)["checkpoints"]
    assert report["ok"] is False
