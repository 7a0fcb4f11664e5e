"""The history store's fixtures. ``store`` and ``other_store`` run every test that takes them on two
topologies: one redis-server, and a real Redis Cluster (3 primaries + 3 replicas). Tests that also take
``redis_server`` or ``redis_url`` (they stop, restart or inspect that one server) run standalone only."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from engram.connections import create_redis, key_space
from engram.history import HistoryStore
from engram.settings import Settings

ONE_SERVER_FIXTURES = {"redis_server", "redis_url"}


def make_store(url: str, **kwargs: object) -> HistoryStore:
    """A store on ``url``: ``redis://`` one server, ``redis+cluster://`` a Cluster (with its key layout)."""
    settings = Settings(redis_url=url)
    return HistoryStore(create_redis(settings), key_space(settings), **kwargs)  # type: ignore[arg-type]


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "store" in metafunc.fixturenames or "other_store" in metafunc.fixturenames:
        one_server = ONE_SERVER_FIXTURES & set(metafunc.fixturenames)
        metafunc.parametrize("topology", ["standalone"] if one_server else ["standalone", "cluster"], indirect=True)


@pytest.fixture
def topology(request: pytest.FixtureRequest) -> str:
    """The URL the stores of this test use: a fresh redis-server's, or the (emptied) shared cluster's."""
    if request.param == "cluster":
        return str(request.getfixturevalue("redis_cluster").url)
    return str(request.getfixturevalue("redis_url"))


@pytest.fixture
async def store(topology: str) -> AsyncIterator[HistoryStore]:
    history = make_store(topology)
    yield history
    await history.client.aclose()


@pytest.fixture
async def other_store(topology: str) -> AsyncIterator[HistoryStore]:
    """A second store on the same Redis: what another replica would be."""
    history = make_store(topology)
    yield history
    await history.client.aclose()
