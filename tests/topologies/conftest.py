"""Topologies a test may break (kill a node, move slots): each such test gets its own."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from testkit.cluster import ClusterTopology


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[ClusterTopology]:
    """A Redis Cluster (3 primaries, 3 replicas) for this test alone."""
    nodes = ClusterTopology(tmp_path / "cluster").start()
    yield nodes
    nodes.stop()
