"""Mirroring a local root to an object store (moto's server, and fsspec's memory://).

Each committed local checkpoint is uploaded in the background and its remote copy read
back and verified; local retention's deletions are mirrored; resume takes the newest
valid checkpoint of local and mirror, so a run survives the loss of its local disk.
"""

from __future__ import annotations

import logging
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

import ckptguard
from ckptguard._protocol.backend import backend_for
from ckptguard._storage.objectstore import FsspecStorage
from s3_servers import S3Server, start_moto


@pytest.fixture(scope="module")
def moto(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    server = start_moto(tmp_path_factory.mktemp("moto"))
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(params=["memory", "moto"])
def mirror(request: pytest.FixtureRequest) -> tuple[str, dict[str, Any] | None]:
    name = f"mirror-{uuid.uuid4().hex[:8]}"
    if request.param == "memory":
        return f"memory://ckptguard-tests/{name}", None
    server: S3Server = request.getfixturevalue("moto")
    return server.url(name), server.storage_options


def _state(step: int) -> dict[str, Any]:
    g = torch.Generator().manual_seed(step)
    return {"w": torch.randn(1000, generator=g), "step": step}


def test_committed_checkpoints_are_mirrored_and_verified(
    tmp_path: Path, mirror: tuple[str, dict[str, Any] | None]
) -> None:
    url, options = mirror
    with ckptguard.CheckpointManager(
        tmp_path / "run", keep_last=2, mirror=url, storage_options=options
    ) as mgr:
        for step in (1, 2, 3):
            mgr.save(step, _state(step))
        mgr.wait()
        assert mgr.mirror is not None
        # checkpoint-1 may be deleted by retention before or while it uploads: then skipped
        assert mgr.mirror.uploaded[-2:] == ["checkpoint-2", "checkpoint-3"]
    storage = FsspecStorage(url, options)
    # local retention deleted checkpoint-1; the mirror followed
    assert backend_for(url, storage=storage).names() == ["checkpoint-2", "checkpoint-3"]
    for name in ("checkpoint-2", "checkpoint-3"):
        report = backend_for(url, storage=storage).verify(f"{url}/{name}", checksums=True)
        assert report.ok, report.problems
        assert report.bytes_checked > 0


def test_resume_after_losing_the_local_disk(
    tmp_path: Path, mirror: tuple[str, dict[str, Any] | None]
) -> None:
    url, options = mirror
    with ckptguard.CheckpointManager(
        tmp_path / "run", keep_last=None, mirror=url, storage_options=options
    ) as mgr:
        for step in (1, 2):
            mgr.save(step, _state(step))
    shutil.rmtree(tmp_path / "run")  # the node is gone
    mgr = ckptguard.CheckpointManager(
        tmp_path / "run", keep_last=None, mirror=url, storage_options=options
    )
    latest = mgr.latest()
    assert latest is not None
    assert latest.step == 2
    assert latest.path == f"{url}/checkpoint-2"
    restored = mgr.restore()
    assert restored["step"] == 2
    assert torch.equal(restored["w"], _state(2)["w"])
    assert mgr.restore(1)["step"] == 1
    mgr.close()


def test_a_newer_valid_mirror_copy_wins_over_a_corrupt_local_one(
    tmp_path: Path, mirror: tuple[str, dict[str, Any] | None]
) -> None:
    url, options = mirror
    root = tmp_path / "run"
    with ckptguard.CheckpointManager(
        root, keep_last=None, mirror=url, storage_options=options
    ) as mgr:
        for step in (1, 2):
            mgr.save(step, _state(step))
    victim = root / "checkpoint-2" / "tensors.safetensors"
    data = bytearray(victim.read_bytes())
    data[-1] ^= 0x01
    victim.write_bytes(bytes(data))
    mgr = ckptguard.CheckpointManager(root, keep_last=None, mirror=url, storage_options=options)
    latest = mgr.latest()
    assert latest is not None
    assert latest.path == f"{url}/checkpoint-2"  # the local one no longer verifies
    assert mgr.restore()["step"] == 2
    mgr.close()


def test_a_failing_mirror_never_fails_a_local_save(
    tmp_path: Path, moto: S3Server, caplog: pytest.LogCaptureFixture
) -> None:
    url = f"s3://no-such-bucket-{uuid.uuid4().hex[:8]}/run"
    mgr = ckptguard.CheckpointManager(
        tmp_path / "run", keep_last=None, mirror=url, storage_options=moto.storage_options
    )
    with caplog.at_level(logging.ERROR, logger="ckptguard"):
        info = mgr.save(1, _state(1)).result()
        assert info.valid  # committed locally
        with pytest.raises(ckptguard.StorageError):
            mgr.wait()
    assert any("mirroring to" in r.getMessage() for r in caplog.records)
    assert mgr.restore(1)["step"] == 1
    mgr.close()


def test_mirror_deletions_wait_while_uploads_fail(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Local retention must not empty the mirror while no newer copy reaches it."""
    from ckptguard._manager.mirror import Mirror

    url = f"memory://ckptguard-tests/mirror-{uuid.uuid4().hex[:8]}"
    mgr = ckptguard.CheckpointManager(tmp_path / "run", keep_last=2, mirror=url)
    mgr.save(1, _state(1))
    mgr.save(2, _state(2))
    mgr.wait()
    upload = Mirror._upload

    def failing(_self: Mirror, local_path: str) -> None:
        raise ckptguard.StorageError(f"injected: cannot upload {local_path}")

    monkeypatch.setattr(Mirror, "_upload", failing)
    mgr.save(3, _state(3))
    mgr.save(4, _state(4))  # local retention deletes 1 and 2
    with pytest.raises(ckptguard.StorageError, match="injected"):
        mgr.wait()
    storage = FsspecStorage(url)
    assert backend_for(url, storage=storage).names() == ["checkpoint-1", "checkpoint-2"]  # kept
    monkeypatch.setattr(Mirror, "_upload", upload)
    mgr.save(5, _state(5))
    mgr.close()
    assert "checkpoint-5" in backend_for(url, storage=storage).names()


def test_an_unreachable_mirror_leaves_local_resume_working(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    url = f"memory://ckptguard-tests/mirror-{uuid.uuid4().hex[:8]}"
    with ckptguard.CheckpointManager(tmp_path / "run", keep_last=None, mirror=url) as mgr:
        mgr.save(1, _state(1))

    def down(_self: FsspecStorage, path: str) -> dict[str, Any]:
        raise ckptguard.StorageError(f"injected: {path} unreachable", path=path)

    monkeypatch.setattr(FsspecStorage, "find", down)
    with caplog.at_level(logging.WARNING, logger="ckptguard"):
        mgr = ckptguard.CheckpointManager(tmp_path / "run", keep_last=None, mirror=url)
        latest = mgr.latest()
        assert latest is not None
        assert latest.step == 1
        assert mgr.restore()["step"] == 1
    assert any("unreachable" in r.getMessage() for r in caplog.records)


def test_exit_finishes_queued_mirror_uploads(tmp_path: Path, moto: S3Server) -> None:
    """A script that saves and exits without close(): its checkpoint still reaches S3."""
    import json
    import os
    import subprocess
    import sys
    import textwrap

    url = moto.url(f"exit-{uuid.uuid4().hex[:8]}")
    script = tmp_path / "child.py"
    script.write_text(
        textwrap.dedent(
            """
            import json, sys, torch, ckptguard
            mgr = ckptguard.CheckpointManager(
                sys.argv[1], mirror=sys.argv[2], storage_options=json.loads(sys.argv[3])
            )
            mgr.save(7, {"w": torch.randn(4 << 20)})  # 16 MiB: the upload outlives the script
            """
        )
    )
    proc = subprocess.run(
        [sys.executable, str(script), str(tmp_path / "run"), url, json.dumps(moto.storage_options)],
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    storage = FsspecStorage(url, moto.storage_options)
    assert backend_for(url, storage=storage).names() == ["checkpoint-7"]
    assert backend_for(url, storage=storage).verify(f"{url}/checkpoint-7").ok
