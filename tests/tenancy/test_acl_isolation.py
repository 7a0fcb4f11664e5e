"""Redis-level isolation: what a tenant's ACL user can and cannot do, on a real redis-server.

Category rules leak (``+@read`` lists other tenants' key names via KEYS/SCAN; even
``+@all -@dangerous -scan -@admin`` lets RANDOMKEY, DBSIZE and FUNCTION FLUSH through), so the user
gets an explicit command allow-list; these tests pin that down.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
import redis.asyncio as aioredis
from redis.exceptions import NoPermissionError, ResponseError

from engram.history.functions import FN_COMMIT, FN_LOAD, LIBRARY_NAME
from engram.tenancy.provision import Credentials
from tests.tenancy.conftest import KEYS, MakeTenant, history, tenant_client

FORBIDDEN = [
    ("KEYS", "*"),
    ("SCAN", "0"),
    ("SCAN", "0", "MATCH", "engram:acme-2:*"),
    ("RANDOMKEY",),
    ("DBSIZE",),
    ("FLUSHALL",),
    ("FLUSHDB",),
    ("CONFIG", "GET", "*"),
    ("CONFIG", "SET", "maxmemory", "1"),
    ("ACL", "LIST"),
    ("ACL", "SETUSER", "engram.acme", "+@all", "~*"),
    ("ACL", "WHOAMI"),
    ("FUNCTION", "LIST"),
    ("FUNCTION", "FLUSH"),
    ("FUNCTION", "DELETE", LIBRARY_NAME),
    ("SCRIPT", "FLUSH"),
    ("SCRIPT", "LOAD", "return 1"),
    ("EVAL", "return redis.call('KEYS', '*')", "0"),
    ("EVAL_RO", "return 1", "0"),
    ("EVALSHA", "e0e1f9fabfc9d4800c877a703b823ac0578ff8db", "0"),
    ("SELECT", "1"),
    ("INFO",),
    ("CLIENT", "LIST"),
    ("MONITOR",),
    ("SUBSCRIBE", "anything"),
    ("PUBLISH", "anything", "x"),
    ("SHUTDOWN",),
    ("GET", "engram:acme:plain"),  # not on the allow-list even for its own keys
    ("SET", "engram:acme:plain", "x"),
]


@pytest.fixture
async def acme(redis_url: str, make_tenant: MakeTenant) -> AsyncIterator[aioredis.Redis]:
    credentials: Credentials = await make_tenant("acme")
    await make_tenant("acme-2")
    client = tenant_client(redis_url, "acme", credentials)
    yield client
    await client.aclose()


@pytest.fixture
async def acme2_session(admin: aioredis.Redis) -> str:
    """acme-2 has one session with one turn, written by the service (admin) user."""
    await history(admin).commit_turn("acme-2", "secret-chat", "t1", "my password is hunter2", "noted")
    return "secret-chat"


async def test_the_tenant_user_can_use_the_history_store_on_its_own_sessions(
    acme: aioredis.Redis, admin: aioredis.Redis
) -> None:
    store = history(acme)
    await store.commit_turn("acme", "s1", "t1", "hello", "hi there")
    await store.commit_turn("acme", "s1", "t2", "how are you", "fine")
    window = await store.load_window("acme", "s1", token_budget=1000)
    assert [m.content for m in window.messages] == ["hello", "hi there", "how are you", "fine"]
    await store.commit_turn("acme", "expired", "t1", "hello", "hi")
    await admin.delete(*KEYS.session("acme", "expired").session_keys())  # as expiry does
    assert [s.session_id for s in (await store.list_sessions("acme")).sessions] == ["s1"]  # and prunes
    assert await store.count_sessions("acme") == 1
    assert await store.delete_session("acme", "s1")
    assert await acme.ping()


async def test_the_tenant_user_cannot_read_another_tenants_session(acme: aioredis.Redis, acme2_session: str) -> None:
    other = KEYS.session("acme-2", acme2_session)
    for attempt in (
        lambda: acme.xrange(other.log),
        lambda: acme.xlen(other.log),
        lambda: acme.hget(other.meta, "epoch"),
        lambda: acme.zrange(other.index, 0, -1),
        lambda: acme.zcard(other.index),
        lambda: acme.fcall(FN_LOAD, 5, other.log, other.meta, other.turns, other.index, other.archive),
        lambda: history(acme).load_window("acme-2", acme2_session, token_budget=1000),
        lambda: history(acme).list_sessions("acme-2"),
    ):
        with pytest.raises(NoPermissionError):
            await attempt()


async def test_the_tenant_user_cannot_write_or_delete_another_tenants_keys(
    acme: aioredis.Redis, admin: aioredis.Redis, acme2_session: str
) -> None:
    other = KEYS.session("acme-2", acme2_session)
    for attempt in (
        lambda: acme.delete(other.log),
        lambda: acme.xadd(other.log, {"role": "user", "content": "injected"}),
        lambda: acme.hset(other.meta, "epoch", "0"),
        lambda: acme.zrem(other.index, acme2_session),
        lambda: acme.expire(other.log, 1),
        lambda: history(acme).commit_turn("acme-2", acme2_session, "t9", "injected", "x"),
        lambda: history(acme).delete_session("acme-2", acme2_session),
        # A session key of its own next to one of acme-2's: refused as a whole.
        lambda: acme.fcall(FN_COMMIT, 5, *KEYS.session("acme", "s").session_keys()[:3], other.index, other.archive),
    ):
        with pytest.raises(NoPermissionError):
            await attempt()
    messages = await history(admin).all_messages("acme-2", acme2_session)
    assert [m.content for m in messages] == ["my password is hunter2", "noted"]


async def test_the_tenant_user_cannot_read_the_tenant_registry(acme: aioredis.Redis) -> None:
    for key in (KEYS.tenant_record("acme"), KEYS.tenant_record("acme-2"), KEYS.tenant_set()):
        with pytest.raises(NoPermissionError):
            await acme.execute_command("HGETALL" if "tenant:" in key else "SMEMBERS", key)


@pytest.mark.parametrize("command", FORBIDDEN, ids=lambda c: " ".join(c)[:40])
async def test_the_tenant_user_cannot_run_server_wide_commands(acme: aioredis.Redis, command: tuple[str, ...]) -> None:
    with pytest.raises(NoPermissionError):
        await acme.execute_command(*command)


async def test_the_admin_sees_that_nothing_was_flushed_or_reconfigured(
    acme: aioredis.Redis, admin: aioredis.Redis, acme2_session: str
) -> None:
    for command in FORBIDDEN:
        try:
            await acme.execute_command(*command)
        except ResponseError:
            pass
    assert await admin.dbsize() > 0
    assert await admin.function_list(library=LIBRARY_NAME)
    assert len(await history(admin).all_messages("acme-2", acme2_session)) == 2
