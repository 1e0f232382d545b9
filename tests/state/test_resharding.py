"""Sharded state saved by 2 ranks restores under 1 and under 4 ranks, bit-exact.

Real processes under torchrun (gloo on CPU), on a local root and on a real S3 server
(moto) at once: one job of 2 ranks saves on both roots, one job of 4 ranks and one of 1
restore from both, each comparing every parameter's full tensor (DTensors sharded by
rows and by columns, uneven over 4 ranks; a plain replicated tensor; non-tensor values)
bit for bit against the same deterministic reference (``sharded_child.reference``).
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
    """Both roots, each with checkpoint-1 and checkpoint-2 saved by 2 ranks."""
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


@pytest.mark.parametrize("nproc", [4, 1])
def test_restores_bit_exact_under_another_world_size(saved: dict[str, Any], nproc: int) -> None:
    roots = list(saved["roots"].values())
    reports = launch(
        "restore", saved["tmp"] / f"restore{nproc}", roots, nproc=nproc, options=saved["options"]
    )
    for rank, report in enumerate(reports):
        assert report["world_size"] == nproc
        for root in roots:
            got = report["roots"][root]
            assert got["newest"] == [], (root, rank, got)
            assert got["step1"] == [], (root, rank, got)
            # resharded, not read whole: 10 rows over 4 ranks are 3, 3, 3, 1
            assert got["rows"] == ([3, 3, 3, 1][rank] if nproc == 4 else 10)
            assert got["cols"] == ([2, 2, 1, 0][rank] if nproc == 4 else 5)
