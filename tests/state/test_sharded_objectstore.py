"""``save(..., sharded=True)`` straight to an object store (a real S3 server, moto).

- one process: the manifest lists each DCP object with the size and xxh3-128 of the
  bytes the store holds (hashed independently here, from the store); restore is
  bit-exact; a flipped byte in a shard is caught before anything reaches the target;
- two ranks under torchrun: rank 1 raising inside its upload aborts the save on both
  ranks with SaveAborted naming rank 1; nothing of that save is left on the store, no
  manifest; latest() and restore still give the previous checkpoint.

Resharding (2 ranks to 1 and 4) on S3 is in ``test_resharding.py``.
"""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
import torch
import xxhash

import ckptguard
from ckptguard._format.layout import MANIFEST_NAME
from s3_servers import S3Server, start_moto
from test_resharding import launch

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


def test_a_rank_failing_mid_upload_aborts_everywhere_and_leaves_nothing(
    tmp_path: Path, moto: S3Server
) -> None:
    prefix = f"abort-{uuid.uuid4().hex[:8]}"
    reports = launch(
        "abort", tmp_path / "out", [moto.url(prefix)], nproc=2, options=moto.storage_options
    )
    for rank, report in enumerate(reports):
        assert report["aborted"] is not None, f"rank {rank} saw no SaveAborted"
        assert list(report["aborted"]["failures"]) == ["1"], report["aborted"]
        assert "simulated failure while uploading on rank 1" in report["aborted"]["failures"]["1"]
        assert report["latest"] == 1
        assert report["restored"] == []  # every rank restored checkpoint-1, bit-exact
    assert reports[1]["reached"] == ["remote.uploading"]  # the fault fired inside an upload
    assert _keys(moto, f"{prefix}/checkpoint-2") == {}  # no manifest, no shard, nothing
    assert f"{prefix}/checkpoint-1/{MANIFEST_NAME}" in _keys(moto, f"{prefix}/checkpoint-1/")
    mgr = ckptguard.CheckpointManager(
        moto.url(prefix), storage_options=moto.storage_options, read_only=True
    )
    assert [i.step for i in mgr.list()] == [1]
    latest = mgr.latest()
    assert latest is not None
    assert latest.step == 1
