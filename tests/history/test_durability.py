"""ENGRAM_COMMIT_DURABILITY=replicated: a turn is acknowledged only once a replica has it, in the commit's
own round trip; without a replica it is refused as NotReplicated, and a retry stores it once."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
import redis
from redis.asyncio.connection import AbstractConnection

from engram.errors import NotReplicated, OutcomeUnknown, StoreUnavailable
from engram.history import HistoryStore
from testkit.monitor import commands_run
from testkit.redis_server import RedisServer
from testkit.sentinel import FAST_REPLICA, wait_until
from tests.history.conftest import make_store


def attach_replica(tmp_path: Path, primary: RedisServer) -> RedisServer:
    with redis.Redis(port=primary.port) as client:  # sync at once (default: wait 5 s for more replicas)
        client.config_set("repl-diskless-sync-delay", 0)
    replica = RedisServer(tmp_path / "replica", None, *FAST_REPLICA, "--replicaof", "127.0.0.1", str(primary.port))
    replica.start()
    with redis.Redis(port=replica.port, decode_responses=True) as client:
        wait_until(lambda: client.info("replication")["master_link_status"] == "up", 10, "the replica to sync")
    return replica


@pytest.fixture
async def replicated(redis_url: str) -> AsyncIterator[HistoryStore]:
    # a replica's confirmation takes a few ms, more on a busy machine: 2 s leaves room (refusals use 100 ms)
    store = make_store(redis_url, commit_durability="replicated", commit_replica_timeout_ms=2000)
    yield store
    await store.client.aclose()


@pytest.fixture
def replica(tmp_path: Path, redis_server: RedisServer) -> Iterator[RedisServer]:
    server = attach_replica(tmp_path, redis_server)
    yield server
    server.stop()


async def test_without_a_replica_a_turn_is_not_acknowledged_and_a_retry_stores_it_once(
    tmp_path: Path, redis_server: RedisServer, replicated: HistoryStore
) -> None:
    impatient = make_store(redis_server.url, commit_durability="replicated", commit_replica_timeout_ms=100)
    try:
        await _refused_until_a_replica_confirms(impatient)
    finally:
        await impatient.client.aclose()
    replica = attach_replica(tmp_path, redis_server)
    try:
        retried = await replicated.commit_turn("acme", "s1", "t1", "q1", "a1")
        assert retried.duplicate and [m.content for m in retried.messages] == ["q1", "a1"]
        assert (await replicated.load_window("acme", "s1", 3000, turn_id="t1")).replay is not None
        fresh = await replicated.commit_turn("acme", "s1", "t2", "q2", "a2")
        assert not fresh.duplicate
        with redis.Redis(port=replica.port, decode_responses=True) as client:  # on the replica already
            assert [fields["content"] for _, fields in client.xrange(replicated.keys.session("acme", "s1").log)] == [
                "q1", "a1", "q2", "a2",
            ]  # fmt: skip
    finally:
        replica.stop()


async def _refused_until_a_replica_confirms(replicated: HistoryStore) -> None:
    with pytest.raises(NotReplicated) as refused:
        await replicated.commit_turn("acme", "s1", "t1", "q1", "a1")
    assert refused.value.turn_id == "t1" and refused.value.code == "not_replicated"
    assert isinstance(refused.value, OutcomeUnknown | StoreUnavailable)  # 503, retry with the turn id
    # Found stored by a retry (in the commit or in the load): still not acknowledged without a replica.
    with pytest.raises(NotReplicated):
        await replicated.commit_turn("acme", "s1", "t1", "q1", "a1")
    with pytest.raises(NotReplicated):
        await replicated.load_window("acme", "s1", 3000, turn_id="t1")


async def test_local_durability_acknowledges_without_a_replica(store: HistoryStore) -> None:
    assert store.commit_durability == "local"
    committed = await store.commit_turn("acme", "s1", "t1", "q1", "a1")
    assert not committed.duplicate


async def test_a_replicated_turn_costs_two_round_trips_and_waits_in_the_commits_one(
    redis_server: RedisServer, replica: RedisServer, replicated: HistoryStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    for n in range(3):  # warm up: connection handshake, function library loaded
        await replicated.load_window("acme", "s1", 3000)
        await replicated.commit_turn("acme", "s1", f"warm{n}", "q", "a")
    writes: list[int] = []  # one socket write per round trip: a pipeline sends all its commands in one
    original = AbstractConnection.send_packed_command

    async def counted(self: AbstractConnection, command: object, check_health: bool = True) -> None:
        writes.append(1)
        await original(self, command, check_health)  # type: ignore[arg-type]

    monkeypatch.setattr(AbstractConnection, "send_packed_command", counted)
    with commands_run(redis_server.port) as seen:
        await replicated.load_window("acme", "s1", 3000)
        await replicated.commit_turn("acme", "s1", "counted", "q", "a")
    assert len(writes) == 2  # load; commit + WAIT pipelined
    assert seen == ["FCALL", "FCALL", "WAIT"]
