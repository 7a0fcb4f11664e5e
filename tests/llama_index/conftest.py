"""The adapters' contract runs on two topologies: ``memory_url`` is a fresh redis-server's URL, then the
shared real Redis Cluster's (``redis+cluster://``, emptied). Tests that inspect one server take ``redis_url``."""

from __future__ import annotations

import pytest


@pytest.fixture(params=["standalone", "cluster"])
def memory_url(request: pytest.FixtureRequest) -> str:
    if request.param == "cluster":
        return str(request.getfixturevalue("redis_cluster").url)
    return str(request.getfixturevalue("redis_url"))
