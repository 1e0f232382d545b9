"""Fixtures of the multi-host tests (the machinery is in ``netns_cluster.py``)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from multihost.netns_cluster import Cluster, make_cluster


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    """Two hosts and an S3 server, shared by the tests of a module (names unique to it)."""
    with make_cluster(tmp_path_factory.mktemp("cluster"), n_hosts=2) as made:
        yield made
