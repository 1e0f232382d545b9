"""Incremental saves (issue 19): unchanged files are linked, not written again.

Real files throughout: bytes written are the process's own count (``wchar`` of
/proc/self/io), sharing is the inode on disk, damage is a flipped bit.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
import torch

import ckptguard
from ckptguard import CheckpointManager
from ckptguard._storage import objectstore
from ckptguard._storage.faults import set_fault_hook
from ckptguard.testing import FaultyStorage, PowerCut, cut_power_at, flip_bit
from proc_io import wchar
from request_counter import counting
from s3_servers import S3Server

if TYPE_CHECKING:
    from collections.abc import Iterator

FROZEN = "model.frozen.safetensors"


def _model(*, frozen: bool = True, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = torch.nn.Sequential(
        torch.nn.Embedding(2048, 128), torch.nn.Linear(128, 128), torch.nn.Linear(128, 8)
    )
    if frozen:  # a frozen embedding and backbone, a small trainable head
        for p in [*model[0].parameters(), *model[1].parameters()]:
            p.requires_grad_(False)
    return model


def _optimizer(model: torch.nn.Module) -> torch.optim.Optimizer:
    return torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.01)


def _train(model: torch.nn.Module, opt: torch.optim.Optimizer, step: int) -> None:
    x = torch.tensor([step % 2048, (step * 7) % 2048])
    model(x).sum().backward()
    opt.step()
    opt.zero_grad()


def _ino(path: Path) -> int:
    return path.stat().st_ino


def _saves(
    root: Path, steps: range, **kwargs: object
) -> tuple[CheckpointManager, torch.nn.Module, list[int]]:
    model = _model()
    opt = _optimizer(model)
    mgr = CheckpointManager(root, keep_last=None, **kwargs)  # type: ignore[arg-type]
    written = []
    for step in steps:
        _train(model, opt, step)
        before = wchar()
        mgr.save(step, {"model": model, "opt": opt, "step": step})
        written.append(wchar() - before)
    return mgr, model, written


def test_frozen_parameters_are_linked_and_not_written_again(tmp_path: Path) -> None:
    root = tmp_path / "run"
    mgr, model, written = _saves(root, range(1, 6))
    try:
        frozen = root / "checkpoint-1" / FROZEN
        assert frozen.stat().st_size > 1 << 20
        for step in range(2, 6):
            ckpt = root / f"checkpoint-{step}"
            assert _ino(ckpt / FROZEN) == _ino(frozen)  # one file on disk, five names
            changed = sum(
                (ckpt / f).stat().st_size for f in ("model.safetensors", "opt.safetensors")
            )
            small = sum((ckpt / f).stat().st_size for f in ("state.json", "ckptguard.json"))
            # Bytes this process wrote for the save: what changed, plus the small files.
            assert written[step - 1] <= 1.1 * changed + small + 16384, (step, written, changed)
            meta = ckptguard.read_manifest(ckpt).metadata["ckptguard"]["incremental"]
            assert meta.pop("linked_by") in {"hardlink", "reflink"}
            assert meta == {
                "chain": step - 1,
                "linked_files": [FROZEN],
                "linked_bytes": frozen.stat().st_size,
            }
        assert written[0] > frozen.stat().st_size  # the first save writes everything
        # Every checkpoint verifies and restores on its own, bit-exact.
        for step in range(1, 6):
            assert mgr.verify(step).ok
        target = _model(seed=1)
        mgr.restore(5, {"model": target, "opt": None, "step": None})
        for (k, a), b in zip(model.state_dict().items(), target.state_dict().values(), strict=True):
            assert torch.equal(a, b), k
    finally:
        mgr.close()


def test_deleting_any_checkpoint_never_damages_another(tmp_path: Path) -> None:
    root = tmp_path / "run"
    mgr, _, _ = _saves(root, range(1, 5))
    mgr.close()
    # retention (keep_last=1 deletes 1..3 on the next save), rm -rf, ckptguard's delete
    shutil.rmtree(root / "checkpoint-1")  # the one the others were linked from
    with CheckpointManager(root, keep_last=2) as mgr:
        mgr.delete(2)
        assert [c.step for c in mgr.list()] == [3, 4]
        for step in (3, 4):
            assert mgr.verify(step).ok
        model = _model()
        mgr.save(5, {"model": model, "opt": _optimizer(model), "step": 5})  # retires 3
        assert [c.step for c in mgr.list()] == [4, 5]
        assert mgr.verify(4).ok
        assert mgr.verify(5).ok


def test_a_source_removed_before_it_is_linked_is_written_instead(tmp_path: Path) -> None:
    root = tmp_path / "run"
    mgr, model, _ = _saves(root, range(1, 4))
    opt = _optimizer(model)
    try:
        # Between the plan and the link (the staging dir exists, nothing written yet),
        # another process removes every committed copy of the frozen file.
        removed: list[str] = []

        def remove_sources(point: str) -> None:
            if point == "stage.created" and not removed:
                for step in (1, 2, 3):
                    (root / f"checkpoint-{step}" / FROZEN).unlink()
                removed.append(point)

        with ckptguard.testing.on_step(remove_sources):
            mgr.save(4, {"model": model, "opt": opt, "step": 4})
        assert removed
        meta = ckptguard.read_manifest(root / "checkpoint-4").metadata["ckptguard"]
        assert meta["incremental"]["linked_files"] == []
        assert (root / "checkpoint-4" / FROZEN).stat().st_nlink == 1
        assert mgr.verify(4).ok
    finally:
        mgr.close()


def test_a_copy_of_a_checkpoint_verifies_on_its_own(tmp_path: Path) -> None:
    root = tmp_path / "run"
    mgr, model, _ = _saves(root, range(1, 4))
    mgr.close()
    copies = {"cp": tmp_path / "cp" / "checkpoint-3", "rsync": tmp_path / "rsync" / "checkpoint-3"}
    copies["cp"].parent.mkdir()
    subprocess.run(["cp", "-r", str(root / "checkpoint-3"), str(copies["cp"])], check=True)
    assert shutil.which("rsync"), "rsync is missing: .ci/run installs it (apt-get install rsync)"
    copies["rsync"].parent.mkdir()
    subprocess.run(["rsync", "-a", f"{root / 'checkpoint-3'}/", f"{copies['rsync']}/"], check=True)
    shutil.rmtree(root)  # the originals, and every file they shared, are gone
    for copy in copies.values():
        assert ckptguard.verify(copy).ok, copy
        target = _model(seed=2)
        ckptguard.load(copy, {"model": target, "opt": None, "step": None})
        for a, b in zip(model.state_dict().values(), target.state_dict().values(), strict=True):
            assert torch.equal(a, b)


def test_a_bit_flip_in_a_shared_file_names_every_checkpoint_it_damages(tmp_path: Path) -> None:
    root = tmp_path / "run"
    mgr, _, _ = _saves(root, range(1, 7), full_every=3)
    try:
        chains = [
            ckptguard.read_manifest(root / f"checkpoint-{s}").metadata["ckptguard"]["incremental"]
            for s in range(1, 7)
        ]
        assert [c["chain"] for c in chains] == [0, 1, 2, 0, 1, 2]  # 1 and 4 are full
        assert _ino(root / "checkpoint-4" / FROZEN) != _ino(root / "checkpoint-1" / FROZEN)
        flip_bit(root / "checkpoint-6" / FROZEN, seed=3)
        report = mgr.verify(6)
        assert not report.ok
        (problem,) = report.problems
        assert "checkpoint-4, checkpoint-5" in problem, problem
        assert not mgr.verify(4).ok
        assert not mgr.verify(5).ok
        # The newest checkpoint that does not share the damaged file: step 3.
        latest = mgr.latest()
        assert latest is not None
        assert latest.step == 3
        restored = mgr.restore()
        assert restored["step"] == 3
    finally:
        mgr.close()


def test_where_everything_changes_nothing_is_linked_and_the_files_are_the_same(
    tmp_path: Path,
) -> None:
    roots = {"on": tmp_path / "on", "off": tmp_path / "off"}
    model = _model(frozen=False)
    opt = _optimizer(model)
    managers = {
        "on": CheckpointManager(roots["on"]),
        "off": CheckpointManager(roots["off"], incremental=False),
    }
    try:
        for step in range(1, 5):
            _train(model, opt, step)
            for mgr in managers.values():
                mgr.save(step, {"model": model, "opt": opt, "step": step})
            on, off = (roots[k] / f"checkpoint-{step}" for k in ("on", "off"))
            assert sorted(os.listdir(on)) == sorted(os.listdir(off))
            for name in ("model.safetensors", "opt.safetensors"):
                assert (on / name).read_bytes() == (off / name).read_bytes()
                assert (on / name).stat().st_nlink == 1
            meta = ckptguard.read_manifest(on).metadata["ckptguard"]["incremental"]
            assert meta["linked_files"] == []
            assert "incremental" not in ckptguard.read_manifest(off).metadata["ckptguard"]
    finally:
        for mgr in managers.values():
            mgr.close()


def test_incremental_off_keeps_the_model_in_one_file(tmp_path: Path) -> None:
    root = tmp_path / "run"
    mgr, model, _ = _saves(root, range(1, 4), incremental=False)
    mgr.close()
    for step in range(1, 4):
        names = sorted(os.listdir(root / f"checkpoint-{step}"))
        assert FROZEN not in names
        assert all((root / f"checkpoint-{step}" / n).stat().st_nlink == 1 for n in names)
    with CheckpointManager(root, incremental=False) as mgr:
        target = _model(seed=3)
        mgr.restore(3, {"model": target, "opt": None, "step": None})
        for a, b in zip(model.state_dict().values(), target.state_dict().values(), strict=True):
            assert torch.equal(a, b)


def test_a_power_cut_right_after_a_link_leaves_every_committed_checkpoint(tmp_path: Path) -> None:
    root = tmp_path / "run"
    storage = FaultyStorage(track=root)
    model = _model()
    opt = _optimizer(model)
    mgr = CheckpointManager(root, keep_last=None, storage=storage)
    for step in (1, 2, 3):
        _train(model, opt, step)
        mgr.save(step, {"model": model, "opt": opt, "step": step})
    with cut_power_at("reuse.linked", storage) as reached, pytest.raises(PowerCut):
        mgr.save(4, {"model": model, "opt": opt, "step": 4})
    assert reached == ["reuse.linked"]
    del mgr  # its storage is dead
    storage.power_loss()  # the disk as it was at the cut: unsynced names and data gone
    with CheckpointManager(root) as after:
        assert [c.step for c in after.list()] == [1, 2, 3]
        for step in (1, 2, 3):
            assert after.verify(step).ok
        # The next save links again and commits.
        after.save(4, {"model": model, "opt": opt, "step": 4})
        assert after.verify(4).ok


def test_full_every_must_be_positive(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="full_every"):
        CheckpointManager(tmp_path / "a", full_every=0)
    with pytest.raises(TypeError, match="incremental must be True, False or None"):
        CheckpointManager(tmp_path / "a", incremental=0)  # type: ignore[arg-type]


def test_list_and_inspect_show_what_each_checkpoint_owns_and_shares(tmp_path: Path) -> None:
    root = tmp_path / "run"
    mgr, _, _ = _saves(root, range(1, 4))
    mgr.close()
    frozen = (root / "checkpoint-1" / FROZEN).stat().st_size

    def cli(*args: str) -> dict[str, object]:
        proc = subprocess.run(
            [sys.executable, "-m", "ckptguard", *args, "--json"],
            capture_output=True, text=True, check=True,
        )  # fmt: skip
        out: dict[str, object] = json.loads(proc.stdout)
        return out

    rows = cli("list", str(root))["checkpoints"]
    assert isinstance(rows, list)
    assert [(r["name"], r["shared_bytes"]) for r in rows] == [
        (f"checkpoint-{s}", frozen) for s in (1, 2, 3)
    ]
    shown = cli("inspect", str(root / "checkpoint-3"))
    assert shown["shared_bytes"] == frozen
    assert shown["shared_files"] == [FROZEN]
    shutil.rmtree(root / "checkpoint-1")
    shutil.rmtree(root / "checkpoint-2")  # checkpoint-3 is the last holder: it owns it now
    assert cli("inspect", str(root / "checkpoint-3"))["shared_bytes"] == 0


def test_a_frameworks_unchanged_files_are_linked_from_the_third_save(tmp_path: Path) -> None:
    """save_files (the Trainer's, Accelerate's): files are written by the framework, so
    the first save after start learns which are unchanged; from then on they are linked."""
    root = tmp_path / "run"
    base = os.urandom(1 << 20)  # a frozen base model's shard: the same every save
    with CheckpointManager(root, keep_last=3) as mgr:
        for step in range(1, 6):

            def write(tx: ckptguard.AtomicCheckpoint) -> None:
                (tx.staging_dir / "base.bin").write_bytes(base)
                (tx.staging_dir / "head.bin").write_bytes(os.urandom(1 << 17))
                (tx.staging_dir / "config.json").write_text('{"layers": 2}')

            mgr.save_files(step, write)
        inodes = {s: _ino(root / f"checkpoint-{s}" / "base.bin") for s in (3, 4, 5)}
        assert len(set(inodes.values())) == 1, inodes  # one file on disk
        linked = {
            s: ckptguard.read_manifest(root / f"checkpoint-{s}").metadata["ckptguard"][
                "incremental"
            ]["linked_files"]
            for s in (3, 4, 5)
        }
        assert linked == {3: ["base.bin"], 4: ["base.bin"], 5: ["base.bin"]}
        assert (root / "checkpoint-5" / "head.bin").stat().st_nlink == 1
        for s in (3, 4, 5):
            assert mgr.verify(s).ok
            assert (root / f"checkpoint-{s}" / "base.bin").read_bytes() == base


def test_on_an_object_store_unchanged_files_are_copied_by_the_server(moto: S3Server) -> None:
    """On by default there too: each reused file is one CopyObject, no byte uploaded;
    every checkpoint keeps objects of its own, so retention deletes them independently.
    The only source is the newest checkpoint: one manifest to read at most."""
    model = _model()
    url = moto.url("incremental")
    with counting() as requests:
        mgr = CheckpointManager(url, storage_options=moto.storage_options, keep_last=2)
        try:
            counts = []
            for step in range(1, 5):
                requests.take()
                with torch.no_grad():
                    head = model.get_submodule("2")
                    assert isinstance(head, torch.nn.Linear)
                    head.weight.add_(1.0)
                mgr.save(step, {"model": model, "step": step})
                counts.append(requests.take())
            assert "CopyObject" not in counts[0]
            assert [c.get("CopyObject", 0) for c in counts[1:]] == [1, 1, 1]
            assert all(c.get("PutObject", 0) == counts[0]["PutObject"] - 1 for c in counts[1:])
            # planning reads the newest manifest only: no more GETs than the first save
            assert all(c.get("GetObject", 0) == counts[0].get("GetObject", 0) for c in counts)
            assert [c.step for c in mgr.list()] == [3, 4]
            for step in (3, 4):
                assert mgr.verify(step).ok
                meta = ckptguard.read_manifest(
                    mgr.backend.join(f"checkpoint-{step}"), storage_options=moto.storage_options
                ).metadata["ckptguard"]["incremental"]
                assert meta["linked_files"] == [FROZEN]
                assert meta["linked_by"] == "copy"
            target = _model(seed=4)
            mgr.restore(4, {"model": target, "step": None})
            for a, b in zip(model.state_dict().values(), target.state_dict().values(), strict=True):
                assert torch.equal(a, b)
        finally:
            mgr.close()
    with CheckpointManager(url, storage_options=moto.storage_options, incremental=False) as off:
        assert off.incremental is None


class _Raw:
    def __init__(self, body: bytes) -> None:
        self.body = body

    async def read(self) -> bytes:
        return self.body


def _refusing(status: int, code: str) -> Any:
    """botocore's before-send for CopyObject: the store's error answer instead."""

    def refuse(request: Any, **_kwargs: object) -> Any:
        from aiobotocore.awsrequest import AioAWSResponse  # type: ignore[import-untyped]

        body = (
            f'<?xml version="1.0" encoding="UTF-8"?><Error><Code>{code}</Code>'
            "<Message>CopyObject refused</Message></Error>"
        ).encode()
        return AioAWSResponse(request.url, status, {"Content-Type": "application/xml"}, _Raw(body))

    return refuse


@pytest.mark.parametrize(
    "refusal",
    [(501, "NotImplemented", [0, 1, 0, 0]), (403, "AccessDenied", [0, 1, 1, 1])],
    ids=["no-copy-store", "copy-denied"],
)
def test_a_store_that_refuses_copies_gets_every_file_uploaded(
    moto: S3Server,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    refusal: tuple[int, str, list[int]],
) -> None:
    """A refused CopyObject: the file is uploaded instead and every checkpoint is whole.
    A store without CopyObject (501) is not asked again; a refusal of one copy (403) is
    that copy's only."""
    status, code, copies = refusal
    original = objectstore.FsspecStorage.__init__

    def init(self: objectstore.FsspecStorage, *args: Any, **kwargs: Any) -> None:
        original(self, *args, **kwargs)
        self.fs.connect()
        self.fs.s3.meta.events.register("before-send.s3.CopyObject", _refusing(status, code))

    monkeypatch.setattr(objectstore.FsspecStorage, "__init__", init)
    model, url = _model(), moto.url(f"no-copy-{status}")
    with (
        counting() as requests,
        CheckpointManager(url, storage_options=moto.storage_options, keep_last=None) as mgr,
    ):
        counts = []
        for step in range(1, 5):
            requests.take()
            mgr.save(step, {"model": model, "step": step})
            counts.append(requests.take())
        assert [c.get("CopyObject", 0) for c in counts] == copies
        assert all(c["PutObject"] == counts[0]["PutObject"] for c in counts)  # all uploaded
        assert [i.step for i in mgr.list()] == [1, 2, 3, 4]
        for step in range(1, 5):
            assert mgr.verify(step).ok
            meta = ckptguard.read_manifest(
                mgr.backend.join(f"checkpoint-{step}"), storage_options=moto.storage_options
            ).metadata["ckptguard"]["incremental"]
            assert meta["linked_files"] == []
        target = _model(seed=4)
        mgr.restore(4, {"model": target, "step": None})
        for a, b in zip(model.state_dict().values(), target.state_dict().values(), strict=True):
            assert torch.equal(a, b)
    refused = [r for r in caplog.records if "server-side copy failed" in r.getMessage()]
    assert len(refused) == sum(copies), [r.getMessage() for r in caplog.records]


def test_a_source_swapped_for_a_symlink_is_not_followed(tmp_path: Path) -> None:
    root = tmp_path / "run"
    mgr, model, _ = _saves(root, range(1, 3))
    try:
        elsewhere = tmp_path / "elsewhere.bin"
        for step in (1, 2):  # every committed copy becomes a symlink to a file outside
            source = root / f"checkpoint-{step}" / FROZEN
            elsewhere.write_bytes(source.read_bytes())
            source.unlink()
            source.symlink_to(elsewhere)
        mgr.save(3, {"model": model, "opt": _optimizer(model), "step": 3})
        written = root / "checkpoint-3" / FROZEN
        assert not written.is_symlink()
        assert written.stat().st_nlink == 1  # written, not linked to anything outside
        assert mgr.verify(3).ok
    finally:
        mgr.close()


# -- async saves: frozen files a committed checkpoint holds are not copied -----------------
def _embedding(model: torch.nn.Module) -> torch.nn.Embedding:
    embedding = model.get_submodule("0")
    assert isinstance(embedding, torch.nn.Embedding)
    return embedding


def _frozen_bytes(model: torch.nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters() if not p.requires_grad)


def test_async_saves_leave_the_frozen_part_out_of_the_snapshot(tmp_path: Path) -> None:
    """From the second incremental save (the first learns the file is unchanged) the
    snapshot's staging buffers hold only what is not linked; a frozen parameter changed
    right after ``save`` returns does not reach the checkpoint (it links the committed
    copy that equals the parameters at the call)."""
    model = _model()
    opt = _optimizer(model)
    frozen_before = [p.detach().clone() for p in model.parameters() if not p.requires_grad]
    with CheckpointManager(tmp_path / "run", keep_last=None, async_save=True) as mgr:
        for step in (1, 2):
            mgr.save(step, {"model": model, "opt": opt, "step": step}, blocking=True)
        for step in (3, 4):
            _train(model, opt, step)
            pending = mgr.save(step, {"model": model, "opt": opt, "step": step})
            kept = _embedding(model).weight.detach().clone()
            with torch.no_grad():  # the training thread goes on, and touches the frozen part
                _embedding(model).weight.add_(1.0)
            pending.result()
            with torch.no_grad():
                _embedding(model).weight.copy_(kept)
        buffers = mgr.saver._buffers  # the staging buffers' size is the point
        assert buffers is not None
        assert 0 < buffers.capacity < _frozen_bytes(model)
        for step in (2, 3, 4):
            assert FROZEN in _linked(tmp_path / "run", step)
            assert mgr.verify(step).ok
        target = _model(seed=5)
        mgr.restore(4, {"model": target, "opt": None, "step": None})
    frozen_after = [p for p in target.parameters() if not p.requires_grad]
    for a, b in zip(frozen_before, frozen_after, strict=True):
        assert torch.equal(a, b)


def _linked(root: Path, step: int) -> list[str]:
    meta = ckptguard.read_manifest(root / f"checkpoint-{step}").metadata["ckptguard"]
    return list(meta["incremental"]["linked_files"])


def _hold_background() -> tuple[threading.Event, Any]:
    """The background save waits at ``stage.created`` until the event is set."""
    go = threading.Event()

    def hook(point: str) -> None:
        if point == "stage.created" and threading.current_thread().name.startswith("ckptguard"):
            assert go.wait(60)

    return go, hook


@pytest.mark.parametrize("changed", [False, True], ids=["unchanged", "changed"])
def test_a_prelinked_frozen_file_whose_source_is_gone_is_written_only_if_unchanged(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, changed: bool
) -> None:
    """The committed copy disappears between ``save()`` and the background link: the live
    parameters are written if they still hash the same; if they changed, the save fails
    with a CheckpointError and nothing of it is visible."""
    from ckptguard._state import reuse as reuse_module

    model = _model()
    opt = _optimizer(model)
    root = tmp_path / "run"
    with CheckpointManager(root, keep_last=None, async_save=True) as mgr:
        for step in (1, 2):
            mgr.save(step, {"model": model, "opt": opt, "step": step}, blocking=True)
        go, hook = _hold_background()
        set_fault_hook(hook)
        try:
            pending = mgr.save(3, {"model": model, "opt": opt, "step": 3})
            monkeypatch.setattr(reuse_module.Reuse, "link", lambda *_a, **_k: False)  # gone
            if changed:
                with torch.no_grad():
                    _embedding(model).weight.add_(1.0)
            go.set()
            if changed:
                with pytest.raises(ckptguard.CheckpointError, match="frozen parameters changed"):
                    pending.result()
                assert not (root / "checkpoint-3").exists()
            else:
                info = pending.result()
                assert info.valid
                assert FROZEN not in _linked(root, 3)  # written
                assert _ino(root / "checkpoint-3" / FROZEN) != _ino(root / "checkpoint-2" / FROZEN)
                assert mgr.verify(3).ok
        finally:
            set_fault_hook(None)
        left = [e.path for e in ckptguard.scan(root).entries if "/staging/" in e.path]
        assert left == []


# -- reflinks: a real XFS filesystem on a loop device --------------------------------------
@pytest.fixture
def xfs(tmp_path: Path) -> Iterator[Path]:
    """A fresh XFS filesystem (reflinks on) mounted on a loop device, for this test only.

    Needs root and mkfs.xfs (xfsprogs: .ci/run installs it); the image is sparse.
    """
    assert shutil.which("mkfs.xfs"), "mkfs.xfs is missing: apt-get install xfsprogs"
    image, mount = tmp_path / "xfs.img", tmp_path / "xfs"
    with image.open("wb") as f:
        f.truncate(320 << 20)  # mkfs.xfs's minimum is 300 MiB
    subprocess.run(["mkfs.xfs", "-q", "-f", "-m", "reflink=1", str(image)], check=True)
    mount.mkdir()
    subprocess.run(["mount", "-o", "loop", str(image), str(mount)], check=True)
    try:
        yield mount
    finally:
        subprocess.run(["umount", str(mount)], check=True)


def test_on_xfs_frozen_files_are_reflinked_and_damage_does_not_spread(xfs: Path) -> None:
    """Reflinks (FICLONE): each checkpoint's frozen file is an inode of its own sharing the
    extents, nothing rewritten; a bit flipped in place in one of them is copied on write,
    so only that checkpoint is damaged; each reflinked file counts as shared."""
    from ckptguard._state.reuse import owned_and_shared

    root = xfs / "run"
    mgr, model, written = _saves(root, range(1, 5))
    try:
        inodes = {_ino(root / f"checkpoint-{s}" / FROZEN) for s in range(1, 5)}
        assert len(inodes) == 4
        frozen_size = (root / "checkpoint-1" / FROZEN).stat().st_size
        for step in (2, 3, 4):
            meta = ckptguard.read_manifest(root / f"checkpoint-{step}").metadata["ckptguard"]
            assert meta["incremental"]["linked_by"] == "reflink"
            assert meta["incremental"]["linked_files"] == [FROZEN]
            assert (root / f"checkpoint-{step}" / FROZEN).stat().st_nlink == 1
            assert written[step - 1] < frozen_size  # not written again
            manifest = ckptguard.read_manifest(root / f"checkpoint-{step}")
            shares = owned_and_shared(str(root / f"checkpoint-{step}"), manifest)
            assert shares is not None
            assert shares[1] >= frozen_size
        flip_bit(root / "checkpoint-3" / FROZEN, seed=3)
        assert not mgr.verify(3).ok
        for step in (1, 2, 4):
            assert mgr.verify(step).ok, step
        target = _model(seed=7)
        mgr.restore(4, {"model": target, "opt": None, "step": None})
        for a, b in zip(model.state_dict().values(), target.state_dict().values(), strict=True):
            assert torch.equal(a, b)
    finally:
        mgr.close()
