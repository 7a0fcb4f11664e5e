"""The history store against a real redis-server: durability across processes, concurrency,
cache correctness, idempotency, TTL, retention, round trips, bad input and Redis failures."""

from __future__ import annotations

import asyncio
import base64
import json
import random
import subprocess
import sys
import time
from pathlib import Path

import pytest
import redis
import redis.asyncio as aioredis

from engram.errors import InvalidCursor, InvalidMessage, InvalidSessionId, MessageTooLarge, StoreFull, StoreUnavailable
from engram.history import HistoryStore
from engram.history.cache import drop_unanswerable_start, fit_budget
from engram.history.store import redis_errors
from engram.llama_index._runtime import url_of
from engram.messages import NewMessage
from engram.policy import Policy
from testkit.monitor import commands_run
from testkit.redis_server import RedisServer
from tests.history.conftest import make_store

ROOT = Path(__file__).resolve().parents[2]


def run_worker(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "tests.history.worker", *args],
        cwd=ROOT, capture_output=True, text=True, timeout=120, check=True,
    )  # fmt: skip


def test_a_turn_committed_by_a_process_that_exited_is_loaded_by_a_new_process(redis_url: str) -> None:
    run_worker("commit", redis_url, "s1", "t1", "my name is Ada", "hello Ada")
    loaded = json.loads(run_worker("load", redis_url, "s1", "3000").stdout)
    assert loaded == {"outcome": "miss", "contents": ["my name is Ada", "hello Ada"]}


def test_concurrent_processes_on_one_session_lose_nothing_and_keep_each_pair_adjacent(redis_url: str) -> None:
    workers, turns = 8, 50
    processes = [
        subprocess.Popen([sys.executable, "-m", "tests.history.worker", "hammer", redis_url, "s1", f"w{w}", str(turns)],
                         cwd=ROOT)
        for w in range(workers)
    ]  # fmt: skip
    assert [p.wait(timeout=120) for p in processes] == [0] * workers
    entries = redis.Redis.from_url(redis_url, decode_responses=True).xrange("engram:acme:{acme:s1}:log")
    contents = [fields["content"] for _, fields in entries]
    assert len(contents) == workers * turns * 2
    for i in range(0, len(contents), 2):
        assert contents[i].startswith("u ") and contents[i + 1] == "a " + contents[i][2:]
    assert len(set(contents)) == len(contents)


async def test_alternating_replicas_each_see_the_previous_turn(store: HistoryStore, other_store: HistoryStore) -> None:
    outcomes = []
    for n in range(10):
        replica = store if n % 2 == 0 else other_store
        window = await replica.load_window("acme", "s1", 3000)
        outcomes.append(window.outcome)
        if n:
            assert window.messages[-2].content == f"question {n - 1}"
            assert window.messages[-1].content == f"answer {n - 1}"
        await replica.commit_turn("acme", "s1", f"t{n}", f"question {n}", f"answer {n}")
    # B has never seen the session; from then on each replica fetches only the other's turn.
    assert outcomes == ["miss", "miss"] + ["delta"] * 8


async def test_the_committing_replica_loads_its_own_next_turn_from_cache(store: HistoryStore) -> None:
    outcomes = []
    for n in range(5):
        outcomes.append((await store.load_window("acme", "s1", 3000)).outcome)
        await store.commit_turn("acme", "s1", f"t{n}", f"q{n}", f"a{n}")
    assert outcomes == ["miss", "hit", "hit", "hit", "hit"]


async def test_a_cached_tail_is_not_served_after_the_session_is_deleted_elsewhere(
    store: HistoryStore, other_store: HistoryStore
) -> None:
    await store.commit_turn("acme", "s1", "t1", "old question", "old answer")
    await store.load_window("acme", "s1", 3000)
    assert await other_store.delete_session("acme", "s1")
    assert (await store.load_window("acme", "s1", 3000)).messages == []
    await other_store.commit_turn("acme", "s1", "t1", "new question", "new answer")
    window = await store.load_window("acme", "s1", 3000)
    assert [m.content for m in window.messages] == ["new question", "new answer"]
    assert window.outcome == "miss"


async def test_window_holds_the_newest_messages_that_fit_the_budget(store: HistoryStore) -> None:
    for n in range(100):
        await store.commit_turn("acme", "s1", f"t{n}", f"question number {n}", f"answer number {n}")
    everything = await store.all_messages("acme", "s1")
    fresh = make_store(url_of(store))  # an empty cache: a miss reads the window from Redis
    window = await fresh.load_window("acme", "s1", 50)
    await fresh.client.aclose()
    assert sum(m.tokens for m in window.messages) <= 50
    assert window.messages == everything[-len(window.messages) :]
    assert window.messages[0].role == "user"
    older = everything[-len(window.messages) - 1]
    assert older.role == "assistant" or sum(m.tokens for m in window.messages) + older.tokens > 50


@pytest.mark.parametrize("seed", range(4))
async def test_windows_always_equal_a_fresh_read_whatever_other_replicas_do(
    store: HistoryStore, other_store: HistoryStore, seed: int
) -> None:
    """Random interleavings of commits, deletes, rewrites, message deletions and retention trims on two
    replicas: every cached load equals the window computed from the full history read afresh."""
    rng = random.Random(seed)
    replicas = [store, other_store]
    for step in range(150):
        actor = rng.choice(replicas)
        action = rng.random()
        if action < 0.55:
            words = " ".join(
                rng.choice(["memory", "redis", "turn", "cache", "token"]) for _ in range(rng.randint(1, 30))
            )
            policy = Policy(max_messages_per_session=rng.choice([8, 40, 1000]))
            await actor.commit_turn("acme", "s1", f"t{step}", f"q{step} {words}", f"a{step}", policy)
        elif action < 0.6:
            await actor.delete_session("acme", "s1")
        elif action < 0.65:
            await actor.replace("acme", "s1", [NewMessage("user", f"rewritten {step}")])
        elif action < 0.7:
            await actor.delete_message_at("acme", "s1", rng.choice([0, -1, 1]))
        else:
            budget = rng.choice([10, 60, 200, 3000])
            window = await actor.load_window("acme", "s1", budget)
            everything = await store.all_messages("acme", "s1")
            expected = drop_unanswerable_start(fit_budget(everything, budget))
            assert window.messages == expected, f"step {step}: stale or wrong window"


async def test_retrying_a_turn_id_stores_it_once_and_returns_the_first_reply(store: HistoryStore) -> None:
    first = await store.commit_turn("acme", "s1", "turn-1", "hi", "first reply")
    again = await store.commit_turn("acme", "s1", "turn-1", "hi", "second reply")
    assert (first.duplicate, again.duplicate) == (False, True)
    assert again.reply == "first reply" and again.messages == first.messages
    assert await store.count_messages("acme", "s1") == 2
    replay = (await store.load_window("acme", "s1", 3000, turn_id="turn-1")).replay
    assert replay is not None and replay.reply == "first reply"


async def test_each_commit_refreshes_the_session_ttl(store: HistoryStore) -> None:
    policy = Policy(session_ttl_seconds=100)
    keys = store.keys.session("acme", "s1")
    await store.commit_turn("acme", "s1", "t1", "q", "a", policy)
    await store.client.expire(keys.log, 5)
    await store.commit_turn("acme", "s1", "t2", "q", "a", policy)
    for key in (keys.log, keys.meta, keys.turns):
        assert 95 <= await store.client.ttl(key) <= 100
    assert await store.client.ttl(keys.index) == -1  # the tenant index never expires


async def test_expired_sessions_vanish_from_the_listing(store: HistoryStore) -> None:
    await store.commit_turn("acme", "short", "t1", "q", "a", Policy(session_ttl_seconds=1))
    await store.commit_turn("acme", "long", "t1", "q", "a", Policy(session_ttl_seconds=100))
    deadline = time.monotonic() + 5
    while await store.client.exists(store.keys.session("acme", "short").log) and time.monotonic() < deadline:
        await asyncio.sleep(0.1)
    assert [s.session_id for s in (await store.list_sessions("acme")).sessions] == ["long"]
    assert await store.count_sessions("acme") == 1  # pruned from the index on the way


async def test_a_session_deleted_and_recreated_during_concurrent_listings_stays_listed(
    store: HistoryStore, other_store: HistoryStore
) -> None:
    """Listings prune sessions whose log is gone. The prune must not remove a session that was
    re-created after the listing read it as empty: it would vanish from every listing (and from an
    index-driven purge) until its next turn. Each round ends with the session re-created and every
    listing finished; then it must be listed."""
    rounds, cycles_per_round, listers = 150, 4, 3
    lost_rounds = []

    async def list_until(stop: asyncio.Event) -> None:
        while not stop.is_set():
            await other_store.list_sessions("acme")

    await store.commit_turn("acme", "s1", "t", "q", "a")
    for n in range(rounds):
        stop = asyncio.Event()
        tasks = [asyncio.create_task(list_until(stop)) for _ in range(listers)]
        for _ in range(cycles_per_round):
            await store.delete_session("acme", "s1")
            await store.commit_turn("acme", "s1", "t", "q", "a")
        stop.set()
        await asyncio.gather(*tasks)
        if await store.client.zscore(store.keys.session_index("acme"), "s1") is None:
            lost_rounds.append(n)
            await store.commit_turn("acme", "s1", "again", "q", "a")  # re-index it for the next round
    assert lost_rounds == [], f"{len(lost_rounds)} of {rounds} rounds lost the live session's index entry"
    assert [s.session_id for s in (await store.list_sessions("acme")).sessions] == ["s1"]


async def test_a_listing_prunes_deleted_sessions_but_keeps_ones_emptied_of_messages(store: HistoryStore) -> None:
    for session_id in ("gone", "emptied", "live"):
        await store.commit_turn("acme", session_id, "t", "q", "a")
    await store.client.delete(*store.keys.session("acme", "gone").session_keys())  # as expiry does
    await store.take_oldest("acme", "emptied", 2, archive=True)  # archived: the session still has keys
    assert [s.session_id for s in (await store.list_sessions("acme")).sessions] == ["live"]
    assert await store.client.zrange(store.keys.session_index("acme"), 0, -1) == ["emptied", "live"]


async def test_deleting_sessions_and_pruning_the_index_work_when_redis_is_at_maxmemory(tmp_path: Path) -> None:
    """A full Redis (noeviction) refuses writes; deleting a session frees space, so it must still run,
    and so must a listing that prunes a session whose keys are gone."""
    server = RedisServer(tmp_path / "redis", None, "--maxmemory", "4mb", "--maxmemory-policy", "noeviction").start()
    store = make_store(server.url)
    try:
        await store.client.zadd(store.keys.session_index("acme"), {"expired": 0})  # its keys are gone
        filler = [NewMessage("user", "x" * 16_000, tokens=1)]
        with pytest.raises(StoreFull):  # Redis' -OOM, as Engram's error
            for _ in range(10_000):
                await store.append("acme", "s1", filler)
        assert [s.session_id for s in (await store.list_sessions("acme")).sessions] == ["s1"]
        assert await store.client.zrange(store.keys.session_index("acme"), 0, -1) == ["s1"]  # pruned while full
        with pytest.raises(StoreFull):
            await store.append("acme", "s1", filler)  # still full
        assert await store.delete_session("acme", "s1")
        assert not await store.client.exists(*store.keys.session("acme", "s1").session_keys())
        assert await store.count_sessions("acme") == 0
    finally:
        await store.client.aclose()
        server.stop()


async def test_retention_keeps_the_newest_messages_and_forgets_trimmed_turn_ids(store: HistoryStore) -> None:
    policy = Policy(max_messages_per_session=6)
    await store.load_window("acme", "s1", 3000)
    for n in range(5):
        await store.commit_turn("acme", "s1", f"t{n}", f"q{n}", f"a{n}", policy)
    contents = [m.content for m in await store.all_messages("acme", "s1")]
    assert contents == ["q2", "a2", "q3", "a3", "q4", "a4"]
    assert await store.client.hkeys(store.keys.session("acme", "s1").turns) == ["t2", "t3", "t4"]
    window = await store.load_window("acme", "s1", 3000)  # the cache drops what was trimmed too
    assert [m.content for m in window.messages] == contents


@pytest.mark.parametrize(
    "policy",
    [Policy(), Policy(requests_per_second=1000, burst=10, max_sessions=10, max_stored_bytes=10**6)],
    ids=["no-quotas", "rate-and-quotas"],
)
async def test_a_turn_costs_two_commands_at_the_server(
    redis_server: RedisServer, store: HistoryStore, policy: Policy
) -> None:
    for n in range(3):  # warm up: connection handshake, function library loaded
        await store.load_window("acme", "s1", 3000, policy=policy)
        await store.commit_turn("acme", "s1", f"warm{n}", "q", "a", policy)
    with commands_run(redis_server.port) as seen:
        await store.load_window("acme", "s1", 3000, policy=policy)
        await store.commit_turn("acme", "s1", "counted", "q", "a", policy)
    assert seen == ["FCALL", "FCALL"]  # load (write-checked, counts the rate), commit (checks the quotas)


async def test_paging_through_messages_returns_each_once_in_order(store: HistoryStore) -> None:
    for n in range(7):
        await store.commit_turn("acme", "s1", f"t{n}", f"q{n}", f"a{n}")
    seen, cursor = [], None
    while True:
        page = await store.messages("acme", "s1", limit=3, cursor=cursor)
        seen += [m.content for m in page.messages]
        if page.next_cursor is None:
            break
        cursor = page.next_cursor
    assert seen == [x for n in range(7) for x in (f"q{n}", f"a{n}")]


async def test_paging_through_sessions_returns_each_once(store: HistoryStore) -> None:
    for n in range(25):
        await store.commit_turn("acme", f"s{n:02d}", "t", "q", "a")
    await store.commit_turn("acme-2", "other", "t", "q", "a")
    seen, cursor = [], None
    while True:
        page = await store.list_sessions("acme", limit=10, cursor=cursor)
        seen += [s.session_id for s in page.sessions]
        if page.next_cursor is None:
            break
        cursor = page.next_cursor
    assert seen == [f"s{n:02d}" for n in range(25)]
    assert all(s.messages == 2 for s in (await store.list_sessions("acme")).sessions)


async def test_delete_removes_every_key_of_the_session(store: HistoryStore) -> None:
    await store.commit_turn("acme", "s1", "t1", "q", "a")
    assert await store.delete_session("acme", "s1")
    assert not await store.client.exists(*store.keys.session("acme", "s1").session_keys())
    assert not await store.delete_session("acme", "s1")
    assert (await store.list_sessions("acme")).sessions == []


async def test_purging_a_tenant_deletes_its_sessions_and_no_other_tenants(store: HistoryStore) -> None:
    for n in range(250):
        await store.commit_turn("acme", f"s{n}", "t", "q", "a")
    await store.commit_turn("acme-2", "s1", "t", "q", "a")
    assert await store.purge_tenant("acme", batch=100) == 250
    assert await store.client.keys("engram:acme:*") == []
    assert await store.count_messages("acme-2", "s1") == 2


def _cursor(value: str) -> str:
    return base64.urlsafe_b64encode(value.encode()).decode().rstrip("=")


@pytest.mark.parametrize(
    ("call", "error"),
    [
        (lambda s: s.commit_turn("acme", "bad id", "t", "q", "a"), InvalidSessionId),
        (lambda s: s.commit_turn("acme", "s1", "t", "   ", "a"), InvalidMessage),
        (lambda s: s.commit_turn("acme", "s1", "t", "x" * 40_000, "a"), MessageTooLarge),
        (lambda s: s.commit_turn("acme", "s1", "bad turn!", "q", "a"), InvalidMessage),
        (lambda s: s.append("acme", "s1", [NewMessage("wizard", "q")]), InvalidMessage),
        (lambda s: s.commit_turn("acme", "s1", "t", "\ud800", "a"), InvalidMessage),
        (lambda s: s.messages("acme", "s1", cursor="not-a-cursor"), InvalidCursor),
        (lambda s: s.list_sessions("acme", cursor="%%%"), InvalidCursor),
        (lambda s: s.list_sessions("acme", cursor=_cursor("bad id")), InvalidCursor),
        (lambda s: s.messages("acme", "s1", cursor=_cursor(f"{2**64}-0")), InvalidCursor),
        (lambda s: s.messages("acme", "s1", cursor=_cursor(f"{2**64 - 1}-{2**64 - 1}")), InvalidCursor),
    ],
)
async def test_bad_input_is_refused_and_stored_history_is_untouched(store: HistoryStore, call, error) -> None:  # type: ignore[no-untyped-def]
    await store.commit_turn("acme", "s1", "t0", "keep me", "kept")
    with pytest.raises(error):
        await call(store)
    assert [m.content for m in await store.all_messages("acme", "s1")] == ["keep me", "kept"]


async def test_unicode_and_control_characters_round_trip_byte_exact(store: HistoryStore) -> None:
    text = 'emoji 🧠, NUL \x00, bell \x07, RTL \u202e, CJK 記憶, newline\n, quote " and \\'
    await store.commit_turn("acme", "s1", "t1", text, text[::-1])
    window = await store.load_window("acme", "s1", 3000)
    assert [m.content for m in window.messages] == [text, text[::-1]]


async def test_redis_down_fails_fast_with_store_unavailable(redis_server: RedisServer, store: HistoryStore) -> None:
    await store.commit_turn("acme", "s1", "t1", "q", "a")
    redis_server.kill()
    started = time.monotonic()
    with pytest.raises(StoreUnavailable):
        await store.load_window("acme", "s1", 3000)
    with pytest.raises(StoreUnavailable):
        await store.commit_turn("acme", "s1", "t2", "q", "a")
    assert time.monotonic() - started < 3
    redis_server.start()  # AOF with fsync always: the acknowledged turn survived the crash
    window = await store.load_window("acme", "s1", 3000)
    assert [m.content for m in window.messages] == ["q", "a"]


async def test_a_connection_closed_under_a_call_is_store_unavailable_and_other_bugs_stay_bugs(
    redis_server: RedisServer,
) -> None:
    # The race redis-py 8.1's cluster client runs into on CLUSTERDOWN, for real: a command starts writing
    # while another task closes its connection (redis/redis-py#4287).
    connection = aioredis.Connection(port=redis_server.port, socket_timeout=2)
    await connection.connect()
    writing = asyncio.create_task(connection.send_packed_command(b"*1\r\n$4\r\nPING\r\n", check_health=False))
    closing = asyncio.create_task(connection.disconnect(nowait=True))
    with pytest.raises(StoreUnavailable, match="the connection was closed"):
        async with redis_errors():
            await writing
    await closing

    for unrelated in (AttributeError("'Window' object has no attribute 'tail'"), RuntimeError("closed"), TypeError()):
        with pytest.raises(type(unrelated)):  # Engram's own bug is a 500 with a log, never passed off as a 503
            async with redis_errors():
                raise unrelated
