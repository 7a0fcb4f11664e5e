"""Tenancy tests run against real redis-server processes (no fakes)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable

import pytest
import redis.asyncio as aioredis

from engram.connections import create_redis
from engram.history import HistoryStore
from engram.policy import Policy
from engram.redis_keys import KeySpace
from engram.settings import Settings
from engram.tenancy.nodes import RedisNodes
from engram.tenancy.provision import Credentials, TenantSpec, ensure_tenant, record_for
from engram.tenancy.records import CLI_OWNER

KEYS = KeySpace()

MakeTenant = Callable[..., Awaitable[Credentials]]


@pytest.fixture
async def admin(redis_url: str) -> AsyncIterator[aioredis.Redis]:
    client = create_redis(Settings(redis_url=redis_url))
    yield client
    await client.aclose()


@pytest.fixture
async def nodes(redis_url: str) -> AsyncIterator[RedisNodes]:
    group = RedisNodes.from_settings(Settings(redis_url=redis_url))
    yield group
    await group.aclose()


@pytest.fixture
def make_tenant(nodes: RedisNodes) -> MakeTenant:
    """Create a tenant the way `engram tenant create` does; returns its clear credentials."""

    async def make(name: str, policy: Policy | None = None, owner: str = CLI_OWNER) -> Credentials:
        credentials = Credentials.generate(name)
        record = record_for(KEYS, TenantSpec(name, policy or Policy()), credentials, owner)
        await ensure_tenant(nodes, KEYS, record)
        return credentials

    return make


def tenant_client(redis_url: str, tenant: str, credentials: Credentials) -> aioredis.Redis:
    """A client logged in as the tenant's ACL user (what a tenant workload would use)."""
    return aioredis.Redis.from_url(
        redis_url, username=f"engram.{tenant}", password=credentials.redis_password, decode_responses=True
    )


def history(client: aioredis.Redis) -> HistoryStore:
    # Token counts are irrelevant here; a trivial counter spares loading tiktoken.
    return HistoryStore(client, KEYS, cache_sessions=0, tokenizer=lambda text: len(text.split()))
