"""API keys resolve to tenants through the registry in a real Redis."""

from __future__ import annotations

import pytest
import redis.asyncio as aioredis

from engram.errors import StoreUnavailable
from engram.policy import Policy
from engram.tenancy.apikeys import generate_api_key, hash_secret
from engram.tenancy.nodes import RedisNodes
from engram.tenancy.provision import remove_tenant
from engram.tenancy.registry import TenantRegistry
from testkit.redis_server import RedisServer
from tests.tenancy.conftest import KEYS, MakeTenant


class Clock:
    """A hand-driven monotonic clock for the cache window."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


async def test_the_right_key_resolves_to_its_tenant_and_policy(admin: aioredis.Redis, make_tenant: MakeTenant) -> None:
    policy = Policy(token_limit=512, session_ttl_seconds=60, max_messages_per_session=50)
    credentials = await make_tenant("acme", policy)
    tenant = await TenantRegistry(admin, KEYS).resolve_api_key(credentials.api_key)
    assert tenant is not None and tenant.name == "acme" and tenant.policy == policy


async def test_wrong_malformed_and_unknown_tenant_keys_resolve_to_none(
    admin: aioredis.Redis, make_tenant: MakeTenant
) -> None:
    credentials = await make_tenant("acme")
    other = await make_tenant("acme-2")
    registry = TenantRegistry(admin, KEYS)
    assert await registry.resolve_api_key(generate_api_key("acme")) is None  # well-formed, wrong secret
    assert await registry.resolve_api_key(generate_api_key("ghost")) is None  # no such tenant
    # acme-2's secret presented as acme's: the tenant in the key decides which hash it is checked against
    forged = "egk_acme." + other.api_key.split(".", 1)[1]
    assert await registry.resolve_api_key(forged) is None
    assert await registry.resolve_api_key("not-a-key") is None
    assert await registry.resolve_api_key(credentials.api_key + "x") is None


async def test_a_rotated_key_stops_working_after_the_cache_window(
    admin: aioredis.Redis, nodes: RedisNodes, make_tenant: MakeTenant
) -> None:
    clock = Clock()
    old = await make_tenant("acme")
    registry = TenantRegistry(admin, KEYS, cache_seconds=2.0, clock=clock)
    assert await registry.resolve_api_key(old.api_key) is not None

    await remove_tenant(nodes, KEYS, "acme", owner=None, purge=False)  # then re-created with a new key
    new = await make_tenant("acme")
    clock.now += 1.0
    assert await registry.resolve_api_key(old.api_key) is not None, "served from cache inside the window"
    assert await registry.resolve_api_key(new.api_key) is not None, "a key never seen is looked up at once"
    clock.now += 1.5
    assert await registry.resolve_api_key(old.api_key) is None


async def test_a_deleted_tenant_stops_resolving_after_the_cache_window(
    admin: aioredis.Redis, nodes: RedisNodes, make_tenant: MakeTenant
) -> None:
    clock = Clock()
    credentials = await make_tenant("acme")
    registry = TenantRegistry(admin, KEYS, cache_seconds=2.0, clock=clock)
    assert await registry.resolve_api_key(credentials.api_key) is not None
    await remove_tenant(nodes, KEYS, "acme", owner=None, purge=False)
    assert await registry.resolve_api_key(credentials.api_key) is not None, "cached"
    clock.now += 2.5
    assert await registry.resolve_api_key(credentials.api_key) is None


async def test_negative_answers_are_cached_too(admin: aioredis.Redis, make_tenant: MakeTenant) -> None:
    clock = Clock()
    registry = TenantRegistry(admin, KEYS, cache_seconds=2.0, clock=clock)
    key = generate_api_key("late")
    assert await registry.resolve_api_key(key) is None
    # The tenant appears with exactly this key: the cached "no" holds until the window ends.
    await admin.hset(
        KEYS.tenant_record("late"),
        mapping={"tenant": "late", "token_limit": "3000", "session_ttl_seconds": "0",
                 "max_messages_per_session": "100", "retention": "Retain", "api_key_sha256": hash_secret(key),
                 "redis_username": "engram.late", "password_sha256": "0" * 64, "owner": "cli"},
    )  # fmt: skip
    assert await registry.resolve_api_key(key) is None
    clock.now += 2.5
    assert await registry.resolve_api_key(key) is not None


async def test_without_a_cache_every_lookup_reads_redis(
    admin: aioredis.Redis, nodes: RedisNodes, make_tenant: MakeTenant
) -> None:
    credentials = await make_tenant("acme")
    registry = TenantRegistry(admin, KEYS, cache_seconds=0)
    assert await registry.resolve_api_key(credentials.api_key) is not None
    await remove_tenant(nodes, KEYS, "acme", owner=None, purge=False)
    assert await registry.resolve_api_key(credentials.api_key) is None


async def test_an_unreadable_record_refuses_the_key(admin: aioredis.Redis, make_tenant: MakeTenant) -> None:
    credentials = await make_tenant("acme")
    await admin.hset(KEYS.tenant_record("acme"), "token_limit", "lots")
    assert await TenantRegistry(admin, KEYS, cache_seconds=0).resolve_api_key(credentials.api_key) is None


async def test_redis_down_raises_store_unavailable(
    redis_server: RedisServer, admin: aioredis.Redis, make_tenant: MakeTenant
) -> None:
    credentials = await make_tenant("acme")
    registry = TenantRegistry(admin, KEYS)
    redis_server.kill()
    with pytest.raises(StoreUnavailable):
        await registry.resolve_api_key(credentials.api_key)
