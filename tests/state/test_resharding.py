"""Sharded state saved by 2 ranks restores under 1 and under 4 ranks, bit-exact.

Real processes under torchrun (gloo on CPU), on a local root and on a real S3 server
(moto) at once, in as few jobs as possible: one job of 2 ranks saves on both roots (and
on S3 has rank 1 fail inside an upload); one job of 4 ranks, and this process as a
world of 1, restore from both, comparing every parameter's full tensor (DTensors
sharded by rows and by columns, uneven over 4 ranks; a plain replicated tensor;
non-tensor values) bit for bit against the same deterministic reference
(``sharded_child.reference``).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

import ckptguard
from ckptguard._format.layout import MANIFEST_NAME
from s3_servers import S3Server, start_moto

if TYPE_CHECKING:
    from collections.abc import Iterator

CHILD = Path(__file__).with_name("sharded_child.py")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def launch(
    mode: str, out: Path, roots: list[str], *, nproc: int, options: dict[str, Any] | None
) -> list[dict[str, Any]]:
    """Run ``sharded_child.py MODE`` under torchrun; every rank's report, errors raised."""
    out.mkdir()
    env = dict(os.environ)
    if options is not None:
        env["CKPTGUARD_STORAGE_OPTIONS"] = json.dumps(options)
    cmd = [
        sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
        "--nnodes=1", "--master_addr=127.0.0.1", f"--master_port={_free_port()}",
        str(CHILD), mode, str(out), *roots,
    ]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=240, check=False, env=env)
    assert proc.returncode == 0, proc.stderr[-4000:]
    reports = [json.loads((out / f"rank{r}.json").read_text()) for r in range(nproc)]
    assert [r["rank"] for r in reports] == list(range(nproc))
    assert [r["error"] for r in reports] == [None] * nproc, reports
    return reports


@pytest.fixture(scope="module")
def moto(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    server = start_moto(tmp_path_factory.mktemp("moto"))
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory, moto: S3Server) -> dict[str, Any]:
    """Both roots, each with checkpoint-1 and checkpoint-2 saved by 2 ranks (S3: and a
    checkpoint-3 that rank 1 failed)."""
    tmp = tmp_path_factory.mktemp("resharding")
    roots = {"local": str(tmp / "run"), "s3": moto.url(f"reshard-{uuid.uuid4().hex[:8]}")}
    reports = launch(
        "save", tmp / "save", list(roots.values()), nproc=2, options=moto.storage_options
    )
    return {"tmp": tmp, "roots": roots, "reports": reports, "options": moto.storage_options}


def test_two_ranks_commit_one_manifest_listing_both_ranks_shards(saved: dict[str, Any]) -> None:
    for kind, root in saved["roots"].items():
        options = saved["options"] if kind == "s3" else None
        report = ckptguard.verify(f"{root}/checkpoint-2", storage_options=options)
        assert report.ok, (kind, report.problems)
        assert report.manifest is not None
        files = {f.path.rsplit("/", 1)[-1] for f in report.manifest.files}
        assert files == {".metadata", "__0_0.distcp", "__1_0.distcp"}, (kind, files)
        assert report.manifest.writer.world_size == 2
        assert report.manifest.metadata["ckptguard"]["kind"] == "dcp"


def test_a_rank_failing_mid_upload_aborts_everywhere_and_leaves_nothing(
    saved: dict[str, Any], moto: S3Server
) -> None:
    root = saved["roots"]["s3"]
    for rank, report in enumerate(saved["reports"]):
        got = report["roots"][root]
        assert got["aborted"] is not None, f"rank {rank} saw no SaveAborted"
        assert list(got["aborted"]) == ["1"], got["aborted"]  # only the rank that failed
        assert "simulated failure while uploading on rank 1" in got["aborted"]["1"]
        assert got["latest"] == 2
    assert saved["reports"][1]["roots"][root]["reached"] == ["remote.uploading"]
    prefix = root.removeprefix(f"s3://{moto.bucket}/")
    client = moto.client()
    keys = [
        o["Key"]
        for o in client.list_objects_v2(Bucket=moto.bucket, Prefix=prefix).get("Contents", [])
    ]
    assert [k for k in keys if "/checkpoint-3" in k] == []  # no manifest, no shard, nothing
    assert f"{prefix}/checkpoint-2/{MANIFEST_NAME}" in keys
    mgr = ckptguard.CheckpointManager(root, storage_options=saved["options"], read_only=True)
    assert [i.step for i in mgr.list()] == [1, 2]
    latest = mgr.latest()
    assert latest is not None
    assert latest.step == 2


def _check_restored(reports: list[dict[str, Any]], roots: list[str], nproc: int) -> None:
    for rank, report in enumerate(reports):
        for root in roots:
            got = report["roots"][root]
            assert got["newest"] == [], (root, rank, got)
            assert got["step1"] == [], (root, rank, got)
            # resharded, not read whole: 10 rows over 4 ranks are 3, 3, 3, 1
            assert got["rows"] == ([3, 3, 3, 1][rank] if nproc == 4 else 10)
            assert got["cols"] == ([2, 2, 1, 0][rank] if nproc == 4 else 5)


def test_restores_bit_exact_under_four_ranks(saved: dict[str, Any]) -> None:
    roots = list(saved["roots"].values())
    reports = launch("restore", saved["tmp"] / "restore4", roots, nproc=4, options=saved["options"])
    assert [r["world_size"] for r in reports] == [4] * 4
    _check_restored(reports, roots, 4)


def test_restores_bit_exact_in_one_process(
    saved: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    import sharded_child

    monkeypatch.setenv("CKPTGUARD_STORAGE_OPTIONS", json.dumps(saved["options"]))
    roots = list(saved["roots"].values())
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{_free_port()}", rank=0, world_size=1
    )
    try:
        report = {"roots": sharded_child.restore(roots, init_device_mesh("cpu", (1,)))}
    finally:
        dist.destroy_process_group()
    _check_restored([report], roots, 1)
