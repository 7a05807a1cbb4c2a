"""Shared fixtures: real node processes on loopback, each test in its own directory."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tetherlab.cluster.localcluster import LocalCluster


@pytest.fixture
def cluster3(tmp_path: Path) -> Iterator[LocalCluster]:
    c = LocalCluster(tmp_path / "cluster", nodes=3)
    c.start()
    try:
        for nid in c.ids:
            c.wait_serving(nid)
        yield c
    finally:
        c.close()


def make_cluster(tmp_path: Path, nodes: int = 3, extra_toml: str = "") -> LocalCluster:
    c = LocalCluster(tmp_path / "cluster", nodes=nodes, extra_toml=extra_toml)
    c.start()
    for nid in c.ids:
        c.wait_serving(nid)
    return c
