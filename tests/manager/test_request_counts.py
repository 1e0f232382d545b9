"""Object-store costs: the requests of start-up, ``latest()`` and a save (its retention
included) do not grow with the number of checkpoints in the root (issue 17, item 7).

Counted on the wire (botocore's before-send event, see ``tests/request_counter.py``)
against moto's real S3 server. Each scenario runs on a root of few and of many
checkpoints and the counts must be equal: one listing of the root, not one listing (or
manifest read, or pin lookup) per checkpoint. ``make bench`` reports the figures for 10
and 1000 checkpoints.
"""

from __future__ import annotations

import uuid
from typing import TYPE_CHECKING, Any

import pytest
import torch

import ckptguard
from request_counter import counting
from s3_servers import S3Server, start_moto

if TYPE_CHECKING:
    from collections.abc import Iterator
    from pathlib import Path

FEW, MANY = 3, 12


@pytest.fixture(scope="module")
def moto(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    server = start_moto(tmp_path_factory.mktemp("moto"))
    try:
        yield server
    finally:
        server.stop()


def _populated(server: S3Server, count: int) -> str:
    url = server.url(f"run-{uuid.uuid4().hex[:8]}")
    mgr = ckptguard.CheckpointManager(
        url, keep_last=None, storage_options=server.storage_options, check_environment=False
    )
    for step in range(1, count + 1):
        mgr.save(step, {"w": torch.full((4,), float(step))}, metrics={"loss": 1.0 / step})
    mgr.close()
    return url


def _costs(server: S3Server, url: str, count: int, **policy: Any) -> dict[str, dict[str, int]]:
    """Requests of start-up, latest(), and two saves, on a root of ``count`` checkpoints."""
    costs = {}
    with counting() as requests:
        mgr = ckptguard.CheckpointManager(
            url, storage_options=server.storage_options, check_environment=False, **policy
        )
        costs["start-up"] = requests.take()
        info = mgr.latest()
        costs["latest"] = requests.take()
        assert info is not None
        assert info.step == count
        for n in (1, 2):
            mgr.save(count + n, {"w": torch.zeros(4)}, metrics={"loss": 2.0})
            costs[f"save {n}"] = requests.take()
        mgr.close()
    return costs


@pytest.mark.parametrize(
    "policy",
    [
        {"keep_last": 2, "keep_every": 1},  # keeps everything: a root that only grows
        {"keep_last": None},
    ],
    ids=["keep_every", "keep_all"],
)
def test_requests_do_not_grow_with_the_checkpoints(
    moto: S3Server, policy: dict[str, Any], tmp_path: Path
) -> None:
    del tmp_path
    few = _costs(moto, _populated(moto, FEW), FEW, **policy)
    many = _costs(moto, _populated(moto, MANY), MANY, **policy)
    for what in few:
        assert many[what]["total"] == few[what]["total"], (what, few[what], many[what])
    # and nothing was deleted: a root that keeps everything keeps everything
    listed = ckptguard.CheckpointManager(
        _populated(moto, 2), storage_options=moto.storage_options, check_environment=False
    ).list()
    assert [c.step for c in listed] == [1, 2]


def test_with_a_best_metric_each_manifest_is_read_once(moto: S3Server) -> None:
    """Ranking by a metric needs every manifest: read once per process, then by ETag."""
    policy = {"keep_last": 2, "keep_every": 1, "best_metric": "loss"}
    few = _costs(moto, _populated(moto, FEW), FEW, **policy)
    many = _costs(moto, _populated(moto, MANY), MANY, **policy)
    assert many["save 1"]["GetObject"] - few["save 1"]["GetObject"] == MANY - FEW
    assert many["save 2"]["total"] == few["save 2"]["total"], (few["save 2"], many["save 2"])
    assert many["latest"]["total"] == few["latest"]["total"]


def test_retention_from_one_listing_still_deletes_the_right_ones(moto: S3Server) -> None:
    url = _populated(moto, 6)
    mgr = ckptguard.CheckpointManager(
        url, keep_last=2, keep_every=3, storage_options=moto.storage_options,
        check_environment=False,
    )  # fmt: skip
    mgr.pin(1)
    mgr.save(7, {"w": torch.zeros(4)})
    assert [c.step for c in mgr.list()] == [1, 3, 6, 7]
    assert mgr.restore(step=6)["w"].tolist() == [6.0] * 4
