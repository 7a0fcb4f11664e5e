"""The reconcile functions shared by the operator and the CLI, on real redis-servers (one with a replica)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
import redis
import redis.asyncio as aioredis
from redis.exceptions import AuthenticationError, ConnectionError, NoPermissionError

from engram.errors import StoreUnavailable
from engram.policy import Policy
from engram.settings import Settings
from engram.tenancy import acl
from engram.tenancy.nodes import RedisNodes
from engram.tenancy.provision import (
    Credentials,
    TenantConflict,
    TenantSpec,
    count_sessions,
    ensure_tenant,
    list_tenants,
    record_for,
    remove_tenant,
)
from testkit.redis_server import RedisServer
from tests.tenancy.conftest import KEYS, MakeTenant, history, tenant_client


async def test_ensuring_a_tenant_twice_changes_nothing_the_second_time(nodes: RedisNodes) -> None:
    record = record_for(KEYS, TenantSpec("acme"), Credentials.generate("acme"), "cli")
    first = await ensure_tenant(nodes, KEYS, record)
    assert any("ACL user engram.acme" in change for change in first)
    assert "wrote the registry record" in first
    assert await ensure_tenant(nodes, KEYS, record) == []


async def test_a_policy_change_updates_only_the_record(nodes: RedisNodes, admin: aioredis.Redis) -> None:
    credentials = Credentials.generate("acme")
    await ensure_tenant(nodes, KEYS, record_for(KEYS, TenantSpec("acme"), credentials, "cli"))
    created_at = await admin.hget(KEYS.tenant_record("acme"), "created_at")
    changed = TenantSpec("acme", Policy(token_limit=100, session_ttl_seconds=0, max_messages_per_session=10))
    changes = await ensure_tenant(nodes, KEYS, record_for(KEYS, changed, credentials, "cli"))
    assert changes == ["updated the registry record (max_messages_per_session, session_ttl_seconds, token_limit)"]
    stored = await admin.hgetall(KEYS.tenant_record("acme"))
    assert (stored["token_limit"], stored["session_ttl_seconds"], stored["max_messages_per_session"]) == (
        "100",
        "0",
        "10",
    )
    assert stored["created_at"] == created_at


async def test_a_deleted_or_widened_acl_user_is_restored(
    nodes: RedisNodes, admin: aioredis.Redis, redis_url: str
) -> None:
    credentials = Credentials.generate("acme")
    record = record_for(KEYS, TenantSpec("acme"), credentials, "cli")
    await ensure_tenant(nodes, KEYS, record)

    await admin.execute_command("ACL", "DELUSER", "engram.acme")
    assert any("set ACL user" in change for change in await ensure_tenant(nodes, KEYS, record))

    await admin.execute_command("ACL", "SETUSER", "engram.acme", "+keys", "~*")  # someone widens it
    assert any("set ACL user" in change for change in await ensure_tenant(nodes, KEYS, record))
    client = tenant_client(redis_url, "acme", credentials)
    try:
        with pytest.raises(NoPermissionError):
            await client.keys("*")
        assert await client.ping()
    finally:
        await client.aclose()


async def test_a_deleted_registry_record_and_set_membership_are_restored(
    nodes: RedisNodes, admin: aioredis.Redis
) -> None:
    record = record_for(KEYS, TenantSpec("acme"), Credentials.generate("acme"), "cli")
    await ensure_tenant(nodes, KEYS, record)
    await admin.delete(KEYS.tenant_record("acme"), KEYS.tenant_set())
    changes = await ensure_tenant(nodes, KEYS, record)
    assert changes == ["wrote the registry record", "added the tenant to the tenant set"]
    assert [r.tenant for r in await list_tenants(admin, KEYS)] == ["acme"]


async def test_a_tenant_of_another_owner_is_left_untouched(nodes: RedisNodes, admin: aioredis.Redis) -> None:
    mine = record_for(KEYS, TenantSpec("acme"), Credentials.generate("acme"), "MemoryNamespace/a/acme")
    await ensure_tenant(nodes, KEYS, mine)
    theirs = record_for(KEYS, TenantSpec("acme"), Credentials.generate("acme"), "MemoryNamespace/b/acme")
    with pytest.raises(TenantConflict, match="already managed by MemoryNamespace/a/acme"):
        await ensure_tenant(nodes, KEYS, theirs)
    with pytest.raises(TenantConflict):
        await remove_tenant(nodes, KEYS, "acme", owner="MemoryNamespace/b/acme", purge=True)
    assert await admin.hget(KEYS.tenant_record("acme"), "api_key_sha256") == mine.api_key_sha256


async def test_removal_with_purge_deletes_every_session_in_batches_and_nothing_of_other_tenants(
    nodes: RedisNodes, admin: aioredis.Redis, make_tenant: MakeTenant
) -> None:
    await make_tenant("acme")
    await make_tenant("acme-2")
    store = history(admin)
    for i in range(250):
        await store.commit_turn("acme", f"s{i}", "t1", "hello", "hi")
    await store.commit_turn("acme-2", "keep", "t1", "hello", "hi")

    removal = await remove_tenant(nodes, KEYS, "acme", owner=None, purge=True, batch=100)

    assert removal.record_deleted and removal.sessions_purged == 250
    assert [key async for key in admin.scan_iter(match="engram:acme:*")] == []
    assert await count_sessions(admin, KEYS, "acme-2") == 1
    assert await acl.get_user(admin, "engram.acme") is None
    assert not await admin.sismember(KEYS.tenant_set(), "acme")


async def test_removal_without_purge_keeps_the_sessions_but_revokes_access(
    nodes: RedisNodes, admin: aioredis.Redis, make_tenant: MakeTenant, redis_url: str
) -> None:
    credentials = await make_tenant("acme")
    await history(admin).commit_turn("acme", "s1", "t1", "hello", "hi")
    client = tenant_client(redis_url, "acme", credentials)
    assert await client.ping()

    removal = await remove_tenant(nodes, KEYS, "acme", owner=None, purge=False)

    assert removal.sessions_purged is None
    assert await count_sessions(admin, KEYS, "acme") == 1
    # Redis drops the deleted user's connections, and it cannot log in again.
    with pytest.raises((ConnectionError, AuthenticationError)):
        await client.ping()
    await client.aclose()


async def test_removing_twice_is_harmless(nodes: RedisNodes, make_tenant: MakeTenant) -> None:
    await make_tenant("acme")
    await remove_tenant(nodes, KEYS, "acme", owner=None, purge=True)
    again = await remove_tenant(nodes, KEYS, "acme", owner=None, purge=True)
    assert not again.record_deleted and again.acl_deleted_on == [] and again.sessions_purged == 0


# --- primary + replica -----------------------------------------------------------------------------------


@pytest.fixture
def replica(redis_server: RedisServer, tmp_path: Path) -> Iterator[RedisServer]:
    with redis.Redis(port=redis_server.port) as primary:
        primary.config_set("repl-diskless-sync-delay", 0)  # sync the replica now, not after 5 s
    # No AOF on the replica: a replica that just synced refuses SIGTERM until its first AOF is written.
    args = ("--replicaof", "127.0.0.1", str(redis_server.port), "--appendonly", "no")
    server = RedisServer(tmp_path / "replica", None, *args).start()
    yield server
    server.stop()


@pytest.fixture
async def two_nodes(redis_url: str, replica: RedisServer) -> AsyncIterator[RedisNodes]:
    group = RedisNodes.from_settings(Settings(redis_url=redis_url, redis_replica_urls=f" {replica.url} ,"))
    yield group
    await group.aclose()


async def test_the_acl_user_is_set_on_every_node_and_the_tenant_reads_from_the_replica(
    two_nodes: RedisNodes, replica: RedisServer, admin: aioredis.Redis
) -> None:
    assert len(two_nodes.replicas) == 1
    credentials = Credentials.generate("acme")
    changes = await ensure_tenant(two_nodes, KEYS, record_for(KEYS, TenantSpec("acme"), credentials, "cli"))
    assert sum("set ACL user" in change for change in changes) == 2
    await history(admin).commit_turn("acme", "s1", "t1", "hello", "hi")

    on_replica = tenant_client(replica.url, "acme", credentials)
    try:
        for _ in range(200):  # the replica's first sync takes a moment
            if await on_replica.xlen(KEYS.session("acme", "s1").log) == 2:
                break
            await asyncio.sleep(0.05)
        # A read from the replica as the tenant (a turn's load is write-checked: it runs on the primary).
        page = await history(on_replica).messages("acme", "s1")
        assert [m.content for m in page.messages] == ["hello", "hi"]
        with pytest.raises(NoPermissionError):
            await on_replica.keys("*")
    finally:
        await on_replica.aclose()


async def test_a_replica_that_lost_its_acl_users_gets_them_back(two_nodes: RedisNodes, replica: RedisServer) -> None:
    record = record_for(KEYS, TenantSpec("acme"), Credentials.generate("acme"), "cli")
    await ensure_tenant(two_nodes, KEYS, record)
    replica.stop()
    replica.start()  # users made with SETUSER do not survive a restart
    changes = await ensure_tenant(two_nodes, KEYS, record)
    assert changes == [f"set ACL user engram.acme on 127.0.0.1:{replica.port}"]


async def test_an_unreachable_replica_fails_the_call_after_the_primary_is_done(
    two_nodes: RedisNodes, replica: RedisServer, admin: aioredis.Redis
) -> None:
    replica.kill()
    record = record_for(KEYS, TenantSpec("acme"), Credentials.generate("acme"), "cli")
    with pytest.raises(StoreUnavailable, match=f"127.0.0.1:{replica.port}"):
        await ensure_tenant(two_nodes, KEYS, record)
    assert await acl.get_user(admin, "engram.acme") is not None
    assert await admin.hget(KEYS.tenant_record("acme"), "api_key_sha256") == record.api_key_sha256


async def test_the_operator_works_with_a_redis_user_limited_to_the_documented_commands(
    admin: aioredis.Redis, redis_url: str
) -> None:
    commands = await acl.supported_commands(admin, acl.OPERATOR_COMMANDS)
    await admin.execute_command(
        "ACL", "SETUSER", "engram-operator", "reset", "on", ">operator-pw", "~engram:*", "resetchannels",
        *(f"+{command}" for command in commands),
    )  # fmt: skip
    settings = Settings(redis_url=redis_url, redis_username="engram-operator", redis_password="operator-pw")
    operator_nodes = RedisNodes.from_settings(settings)
    try:
        record = record_for(KEYS, TenantSpec("acme"), Credentials.generate("acme"), "cli")
        # a fresh Redis: the operator must load the library itself
        assert "loaded the Redis function library" in await ensure_tenant(operator_nodes, KEYS, record)
        await history(admin).commit_turn("acme", "s1", "t1", "hello", "hi")
        assert await count_sessions(operator_nodes.primary, KEYS, "acme") == 1
        assert [r.tenant for r in await list_tenants(operator_nodes.primary, KEYS)] == ["acme"]
        removal = await remove_tenant(operator_nodes, KEYS, "acme", owner="cli", purge=True)
        assert removal.sessions_purged == 1 and removal.acl_deleted_on
    finally:
        await operator_nodes.aclose()
    assert not await admin.acl_log(), "nothing was denied"
