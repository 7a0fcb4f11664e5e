from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from engram.connections import create_redis
from engram.history import HistoryStore
from engram.redis_keys import KeySpace
from engram.settings import Settings


def make_store(url: str, **kwargs: object) -> HistoryStore:
    return HistoryStore(create_redis(Settings(redis_url=url)), KeySpace(), **kwargs)  # type: ignore[arg-type]


@pytest.fixture
async def store(redis_url: str) -> AsyncIterator[HistoryStore]:
    history = make_store(redis_url)
    yield history
    await history.client.aclose()


@pytest.fixture
async def other_store(redis_url: str) -> AsyncIterator[HistoryStore]:
    """A second store on the same Redis: what another replica would be."""
    history = make_store(redis_url)
    yield history
    await history.client.aclose()
