"""``save(..., sharded=True)`` straight to an object store (a real S3 server, moto).

The manifest lists each DCP object with the size and xxh3-128 of the bytes the store
holds (hashed independently here, from the store); restore is bit-exact; a flipped byte
in a shard is caught before anything reaches the target.

With several ranks under torchrun (every rank's objects in one manifest, a rank failing
mid-upload aborting everywhere and leaving nothing, resharding to 1 and 4 ranks on S3):
``test_resharding.py``, whose one job of 2 ranks saves for all of them.
"""

from __future__ import annotations

import shutil
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
import torch
import xxhash

import ckptguard
from ckptguard._format.layout import MANIFEST_NAME
from ckptguard._state.dcp_storage import StoreReader, _ReadStream
from s3_servers import S3Server, start_moto

if TYPE_CHECKING:
    from collections.abc import Iterator


@pytest.fixture(scope="module")
def moto(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    server = start_moto(tmp_path_factory.mktemp("moto"))
    try:
        yield server
    finally:
        server.stop()


def _keys(server: S3Server, prefix: str) -> dict[str, bytes]:
    """Every object under ``prefix`` in the server's bucket, read with boto3 (not ckptguard)."""
    client = server.client()
    found = client.list_objects_v2(Bucket=server.bucket, Prefix=prefix).get("Contents", [])
    return {
        o["Key"]: client.get_object(Bucket=server.bucket, Key=o["Key"])["Body"].read()
        for o in found
    }


def _state(step: int) -> dict[str, Any]:
    g = torch.Generator().manual_seed(step)
    return {
        "w": torch.randn(64, 32, generator=g),
        "b": torch.randn(5, generator=g).to(torch.bfloat16),
        "meta": {"step": step, "tag": "x" * step},
    }


def _zeros() -> dict[str, Any]:
    return {
        "w": torch.zeros(64, 32),
        "b": torch.zeros(5, dtype=torch.bfloat16),
        "meta": {"step": 0, "tag": ""},
    }


def _same(got: dict[str, Any], want: dict[str, Any]) -> bool:
    bits = [
        got[k].view(torch.uint8).numpy().tobytes() == want[k].view(torch.uint8).numpy().tobytes()
        for k in ("w", "b")
    ]
    return all(bits) and got["meta"] == want["meta"]


def test_one_process_save_lists_every_object_as_the_store_holds_it(moto: S3Server) -> None:
    prefix = f"one-{uuid.uuid4().hex[:8]}"
    mgr = ckptguard.CheckpointManager(moto.url(prefix), storage_options=moto.storage_options)
    info = mgr.save(1, _state(1), sharded=True)
    assert info.path == moto.url(f"{prefix}/checkpoint-1")
    objects = _keys(moto, f"{prefix}/checkpoint-1/")
    manifest = ckptguard.read_manifest(info.path, storage_options=moto.storage_options)
    assert manifest.metadata["ckptguard"]["kind"] == "dcp"
    listed = {f"{prefix}/checkpoint-1/{f.path}": f for f in manifest.files}
    assert {k.rsplit("/", 1)[-1] for k in listed} == {".metadata", "__0_0.distcp"}
    assert set(objects) == {*listed, f"{prefix}/checkpoint-1/{MANIFEST_NAME}"}
    for key, entry in listed.items():
        assert entry.path.startswith(f"{manifest.save_id}/")
        assert entry.size == len(objects[key])
        assert entry.checksum == xxhash.xxh3_128(objects[key]).hexdigest()
    target = _zeros()
    mgr.restore(target=target)
    assert _same(target, _state(1))


def test_a_flipped_byte_in_a_shard_is_caught_before_the_target_changes(moto: S3Server) -> None:
    prefix = f"flip-{uuid.uuid4().hex[:8]}"
    mgr = ckptguard.CheckpointManager(moto.url(prefix), storage_options=moto.storage_options)
    mgr.save(1, _state(1), sharded=True)
    mgr.save(2, _state(2), sharded=True)
    objects = _keys(moto, f"{prefix}/checkpoint-2/")
    (key,) = [k for k in objects if k.endswith(".distcp")]
    data = bytearray(objects[key])
    data[len(data) // 2] ^= 0x01
    moto.client().put_object(Bucket=moto.bucket, Key=key, Body=bytes(data))
    target = _zeros()
    with pytest.raises(ckptguard.CorruptCheckpoint, match="checksum"):
        mgr.restore(2, target=target)
    assert _same(target, _zeros())  # verified first: nothing reached the target
    mgr.restore(target=target)  # the newest that verifies
    assert _same(target, _state(1))


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled:UserWarning")
def test_the_reader_opens_only_listed_files_and_reads_only_inside_them(tmp_path: Path) -> None:
    """DCP's (pickled) metadata names the files and ranges: the reader holds it to the manifest."""
    from torch.distributed.checkpoint.api import CheckpointException
    from torch.distributed.checkpoint.state_dict_loader import load

    mgr = ckptguard.CheckpointManager(tmp_path / "run")
    info = mgr.save(1, _state(1), sharded=True)
    manifest, opener, close = mgr.backend.open_files(
        info.path, mgr.backend.read_manifest(info.path)
    )
    try:
        reader = StoreReader(info.path, opener, {".metadata"})  # the shard left out
        target = _zeros()
        with pytest.raises(CheckpointException) as caught:
            load(target, storage_reader=reader)
        (error, _trace) = caught.value.failures[0]
        assert isinstance(error, ckptguard.CorruptCheckpoint)
        assert "does not list" in str(error)
        assert _same(target, _zeros())
        shard = opener("__0_0.distcp")
        try:
            with pytest.raises(ckptguard.CorruptCheckpoint, match="past its end"):
                _ReadStream(shard).read_range(shard.size - 4, 8)
            assert (
                _ReadStream(shard).read_range(2, 6).read()
                == Path(info.path, "__0_0.distcp").read_bytes()[2:8]
            )
        finally:
            shard.close()
        assert {f.path for f in manifest.files} == {".metadata", "__0_0.distcp"}
    finally:
        close()


def test_a_sharded_checkpoint_restores_from_the_mirror_when_the_local_copy_is_gone(
    tmp_path: Path, moto: S3Server
) -> None:
    mirror = moto.url(f"mirror-{uuid.uuid4().hex[:8]}")
    root = tmp_path / "run"
    with ckptguard.CheckpointManager(
        root, mirror=mirror, storage_options=moto.storage_options
    ) as mgr:
        mgr.save(1, _state(1), sharded=True)
        mgr.wait()  # the upload and the remote verification
    assert f"{mirror.removeprefix(f's3://{moto.bucket}/')}/checkpoint-1/{MANIFEST_NAME}" in _keys(
        moto, mirror.removeprefix(f"s3://{moto.bucket}/")
    )
    shutil.rmtree(root / "checkpoint-1")  # the node's disk is lost
    mgr = ckptguard.CheckpointManager(root, mirror=mirror, storage_options=moto.storage_options)
    target = _zeros()
    mgr.restore(1, target=target)
    assert _same(target, _state(1))
    mgr.close()
