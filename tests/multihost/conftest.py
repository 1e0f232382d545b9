"""Fixtures of the multi-host tests (the machinery is in ``netns_cluster.py``).

The sweep (more kill points, marked ``multihost_sweep``) runs only with
``CKPTGUARD_MULTIHOST_SWEEP=1`` (``make chaos``); otherwise it is deselected, not skipped:
a skipped test would read as a test that passed.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from multihost.netns_cluster import Cluster, make_cluster


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    """Two hosts and an S3 server, shared by the tests of a module (names unique to it)."""
    with make_cluster(tmp_path_factory.mktemp("cluster"), n_hosts=2) as made:
        yield made


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        "multihost_sweep: more multi-host kill points, collected only with "
        "CKPTGUARD_MULTIHOST_SWEEP=1 (make chaos)",
    )


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if os.environ.get("CKPTGUARD_MULTIHOST_SWEEP", "0") == "1":
        return
    keep = [item for item in items if item.get_closest_marker("multihost_sweep") is None]
    if len(keep) != len(items):
        config.hook.pytest_deselected(items=[i for i in items if i not in keep])
        items[:] = keep
