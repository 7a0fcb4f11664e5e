"""Tenant quotas, request rate, erasure by subject and export, in the store against a real redis-server.

Usage is counted inside the library's functions; these tests hold it equal to what is really stored
(recounted from the streams) after every kind of write, and check that a quota is never exceeded."""

from __future__ import annotations

import asyncio
import random
import time

import pytest

from engram.errors import RateLimited, SessionQuotaExceeded, StorageQuotaExceeded, SubjectMismatch
from engram.history import HistoryStore
from engram.messages import NewMessage
from engram.policy import Policy
from tests.history.conftest import make_store


async def stored_bytes(store: HistoryStore, tenant: str) -> int:
    """The tenant's message bytes recounted from its streams (what the usage counter must equal)."""
    total = 0
    async for key in store.client.scan_iter(match=store.keys.tenant_key_pattern(tenant)):
        if key.endswith((":log", ":archive")):
            for _, fields in await store.client.xrange(key):
                total += sum(len(fields.get(f, "").encode()) for f in ("role", "content", "extra"))
    return total


async def test_usage_equals_the_stored_bytes_after_every_kind_of_write(store: HistoryStore) -> None:
    tenant, policy = "acme", Policy(max_messages_per_session=6)
    steps = [
        store.commit_turn(tenant, "s1", "t1", "héllo", "wörld", policy),
        store.commit_turn(tenant, "s1", "t1", "héllo", "wörld", policy),  # a retry stores (and counts) nothing
        store.commit_turn(tenant, "s2", "t2", "a" * 100, "b" * 50, policy),
        store.append(tenant, "s1", [NewMessage("user", "x" * 30, extra='{"k": 1}')], policy),
        *(store.commit_turn(tenant, "s1", f"r{i}", f"q{i}", f"a{i}", policy) for i in range(4)),  # trims
        store.insert_at(tenant, "s1", 0, NewMessage("system", "be brief"), policy),
        store.delete_message_at(tenant, "s1", -1),
        store.take_oldest(tenant, "s1", 2, archive=True),
        store.take_oldest(tenant, "s1", 1, archive=False),
        store.replace(tenant, "s2", [NewMessage("user", "short")], policy),
        store.delete_session(tenant, "s2"),
    ]
    for n, step in enumerate(steps):
        await step
        usage = await store.usage(tenant)
        assert usage.stored_bytes == await stored_bytes(store, tenant), f"after step {n}"
    assert (await store.usage(tenant)).sessions == 1


async def test_a_session_stored_before_usage_was_counted_is_counted_on_its_next_write(store: HistoryStore) -> None:
    await store.commit_turn("acme", "old", "t1", "hello", "there")
    await store.client.delete(store.keys.usage("acme"))  # as a session written by engram_v3 would be
    await store.commit_turn("acme", "old", "t2", "again", "yes")
    assert (await store.usage("acme")).stored_bytes == await stored_bytes(store, "acme")


async def test_a_new_session_over_max_sessions_is_refused_and_nothing_is_written(store: HistoryStore) -> None:
    policy = Policy(max_sessions=2)
    await store.commit_turn("acme", "s1", "t1", "q", "a", policy)
    await store.commit_turn("acme", "s2", "t1", "q", "a", policy)
    with pytest.raises(SessionQuotaExceeded, match="maximum of 2 sessions"):
        await store.commit_turn("acme", "s3", "t1", "q", "a", policy)
    assert not await store.exists("acme", "s3")
    await store.commit_turn("acme", "s1", "t2", "existing sessions", "still take turns", policy)
    await store.delete_session("acme", "s2")
    await store.commit_turn("acme", "s3", "t1", "a deleted session", "frees its place", policy)
    assert (await store.usage("acme")).sessions == 2


async def test_an_expired_session_frees_its_place_and_its_bytes(store: HistoryStore) -> None:
    policy = Policy(max_sessions=1, session_ttl_seconds=1)
    await store.commit_turn("acme", "s1", "t1", "q", "a", policy)
    with pytest.raises(SessionQuotaExceeded):
        await store.commit_turn("acme", "s2", "t1", "q", "a", policy)
    deadline = time.monotonic() + 30  # expired after 1 s; the sweep waits 1 s more for clock jitter
    while True:
        try:
            await store.commit_turn("acme", "s2", "t1", "q", "a", policy)
            break
        except SessionQuotaExceeded:
            assert time.monotonic() < deadline, "an expired session kept its place"
            await asyncio.sleep(0.2)
    assert (await store.usage("acme")).stored_bytes == await stored_bytes(store, "acme")


async def test_the_bytes_quota_is_never_exceeded_by_50_concurrent_writers(redis_url: str) -> None:
    quota = 20_000
    policy = Policy(max_stored_bytes=quota)
    stores = [make_store(redis_url) for _ in range(5)]
    outcomes: list[str] = []

    async def writer(n: int) -> None:
        store = stores[n % len(stores)]
        for turn in range(10):
            try:
                await store.commit_turn("acme", f"s{n}", f"t{turn}", "q" * 40, "a" * 60, policy)
                outcomes.append("ok")
            except StorageQuotaExceeded:
                outcomes.append("refused")

    try:
        await asyncio.gather(*(writer(n) for n in range(50)))
        stored = await stored_bytes(stores[0], "acme")
        assert stored <= quota
        assert stored == (await stores[0].usage("acme")).stored_bytes
        ok = outcomes.count("ok")
        assert stored == ok * (len("user") + 40 + len("assistant") + 60)  # every accepted turn whole, no half
        assert outcomes.count("refused") == 500 - ok > 0
        assert quota - stored < len("user") + 40 + len("assistant") + 60  # refused only when it would not fit
    finally:
        for store in stores:
            await store.client.aclose()


async def test_the_request_rate_allows_a_burst_then_the_rate(store: HistoryStore) -> None:
    policy = Policy(requests_per_second=2, burst=3)
    for _ in range(3):
        await store.load_window("acme", "s1", 100, policy=policy)
    with pytest.raises(RateLimited) as refused:
        await store.load_window("acme", "s1", 100, policy=policy)
    assert 0 < refused.value.retry_after <= 0.5
    await asyncio.sleep(refused.value.retry_after + 0.05)
    await store.load_window("acme", "s1", 100, policy=policy)
    await store.load_window("other", "s1", 100, policy=policy)  # another tenant has its own rate
    await store.load_window("acme", "s1", 100)  # the library (no policy given) is not limited


async def test_erasing_a_subject_leaves_nothing_of_its_sessions(store: HistoryStore) -> None:
    for session in ("a1", "a2"):
        await store.commit_turn("acme", session, "t1", "my secret", "noted", subject="alice@example.com")
        await store.take_oldest("acme", session, 1, archive=True)
        keys = store.keys.session("acme", session)  # a rolling summary and memory blocks' state, as they are kept
        await store.client.hset(keys.summary, mapping={"text": "alice's secret", "covers_through": "1-0"})
        await store.client.zadd(keys.memory_blocks.facts, {"facts:alice is secretive": 1})
        await store.client.hset(keys.memory_blocks.blocks, "static", '"alice"')
    await store.commit_turn("acme", "b1", "t1", "bob here", "hi bob", subject="bob")
    await store.commit_turn("acme", "plain", "t1", "no subject", "fine")
    with pytest.raises(SubjectMismatch):
        await store.commit_turn("acme", "a1", "t2", "not alice", "no", subject="bob")

    assert await store.erase_subject("acme", "alice@example.com") == 2
    assert await store.erase_subject("acme", "alice@example.com") == 0

    remaining = [k async for k in store.client.scan_iter(match="*")]  # as the admin: every key
    assert not [k for k in remaining if "a1" in k or "a2" in k or "alice" in k], remaining
    assert await store.client.zrange(store.keys.session_index("acme"), 0, -1) == ["b1", "plain"]
    assert set(await store.client.hkeys(store.keys.usage("acme"))) == {":bytes", "b1", "plain"}
    assert await store.client.zrange(store.keys.session_expiry("acme"), 0, -1) == ["b1", "plain"]
    assert (await store.usage("acme")).stored_bytes == await stored_bytes(store, "acme")
    assert [m.content for m in await store.all_messages("acme", "b1")] == ["bob here", "hi bob"]


async def test_deleting_a_session_unlinks_it_from_its_subject(store: HistoryStore) -> None:
    await store.commit_turn("acme", "a1", "t1", "q", "a", subject="alice")
    await store.delete_session("acme", "a1")
    assert not await store.client.exists(store.keys.subject("acme", "alice"))


async def test_export_gives_archived_messages_then_the_log_in_order(store: HistoryStore) -> None:
    for i in range(7):
        await store.commit_turn("acme", "s1", f"t{i}", f"q{i}", f"a{i}")
    await store.take_oldest("acme", "s1", 4, archive=True)
    exported = [(item.archived, item.message.content) async for item in store.export("acme", "s1", batch=3)]
    contents = [c for i in range(7) for c in (f"q{i}", f"a{i}")]
    assert exported == [(n < 4, c) for n, c in enumerate(contents)]


async def test_usage_stays_exact_through_a_random_mix_of_writes(store: HistoryStore) -> None:
    """Random commits, rewrites, inserts, deletes and archiving on two sessions (seeded: a failure repeats)."""
    rnd = random.Random(20261202)
    policy = Policy(max_messages_per_session=8)
    for n in range(300):
        session, op = rnd.choice(["a", "b"]), rnd.randrange(7)
        message = NewMessage(rnd.choice(["user", "assistant"]), "é" * rnd.randrange(1, 20))
        if op == 0:
            await store.replace("acme", session, [message] * rnd.randrange(0, 3), policy)
        elif op == 1:
            await store.append("acme", session, [message, message], policy, turn_id=f"t{rnd.randrange(5)}")
        elif op == 2:
            await store.insert_at("acme", session, rnd.randrange(-3, 4), message, policy)
        elif op == 3:
            await store.delete_message_at("acme", session, rnd.randrange(-3, 3))
        elif op == 4:
            await store.delete_session("acme", session)
        else:
            await store.take_oldest("acme", session, rnd.randrange(0, 3), archive=op == 5)
        usage = await store.usage("acme")
        assert usage.stored_bytes == await stored_bytes(store, "acme"), f"op {n}"
        assert usage.sessions == sum([await store.exists("acme", s) for s in ("a", "b")]), f"op {n}"
