"""Every user of a Redis client in sentinel mode: the library through a ``redis+sentinel://`` URL (also after
a copy by pickle or to_dict, and from sync code), ``engram tenant``, and the service's answer when a turn
cannot be confirmed by a replica (503 ``not_replicated``, a retry with the turn id stores it once)."""

from __future__ import annotations

import os
import pickle
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import redis as sync_redis
from llama_index.core.base.llms.types import ChatMessage

from engram.connections import parse_sentinel_url
from engram.llama_index import RedisChatStore, store_from_url
from testkit.redis_server import RedisServer
from testkit.sentinel import FAST_REPLICA, SentinelTopology, wait_until
from tests.server.support import REPO, ServiceProcess, service_env


@pytest.fixture
def topology(tmp_path: Path) -> Iterator[SentinelTopology]:
    nodes = SentinelTopology(tmp_path / "redis", replicas=1, sentinels=3).start()
    yield nodes
    nodes.stop()


@pytest.mark.parametrize(
    ("url", "problem"),
    [
        ("redis+sentinel://s0:26379", "expected redis+sentinel://host:port"),
        ("redis+sentinel://s0:26379/engram/x", "expected redis+sentinel://host:port"),
        ("redis+sentinel://s0/engram", "'s0' is not host:port"),
        ("redis+sentinel:///engram", "expected redis+sentinel://host:port"),
    ],
)
def test_a_malformed_sentinel_url_is_refused_naming_the_problem(url: str, problem: str) -> None:
    with pytest.raises(ValueError, match="invalid redis\\+sentinel URL") as refused:
        parse_sentinel_url(url)
    assert problem in str(refused.value)


def test_a_sentinel_url_carries_sentinels_service_database_and_user() -> None:
    target = parse_sentinel_url("redis+sentinel://app:secret@s0:26379,[::1]:26380/my-primary/2")
    assert target.sentinels == [("s0", 26379), ("::1", 26380)]
    assert (target.service, target.db, target.username, target.password) == ("my-primary", 2, "app", "secret")


async def test_the_library_follows_the_sentinels_primary_and_copies_keep_the_topology(
    topology: SentinelTopology,
) -> None:
    chat_store = RedisChatStore(redis_url=topology.url, tenant="acme")
    chat_store.add_message("user:1", ChatMessage(role="user", content="hello"))
    await chat_store.async_add_message("user:1", ChatMessage(role="assistant", content="hi"))
    for copy in (pickle.loads(pickle.dumps(chat_store)), RedisChatStore.from_dict(chat_store.to_dict())):
        assert [m.content for m in copy.get_messages("user:1")] == ["hello", "hi"]
    from_store = RedisChatStore(store=store_from_url(topology.url), tenant="acme")
    assert from_store.redis_url == topology.url  # a store on Sentinels serializes as its redis+sentinel URL
    assert [m.content for m in from_store.get_messages("user:1")] == ["hello", "hi"]
    with topology.primary().client() as client:  # on the primary the Sentinels name
        assert client.keys("engram:acme:*:log")


def test_engram_tenant_creates_a_tenant_on_every_node_in_sentinel_mode(topology: SentinelTopology) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("ENGRAM_")}
    env.update(ENGRAM_REDIS_MODE="sentinel", ENGRAM_REDIS_SENTINELS=topology.sentinel_addresses)
    run = subprocess.run(
        [sys.executable, "-c", "import sys; from engram.cli import main; sys.exit(main())", "tenant", "create", "acme"],
        env=env,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert run.returncode == 0, run.stderr
    for node in topology.nodes:
        with node.client() as client:
            assert client.acl_getuser("engram.acme"), f"no tenant user on {node.name}"


async def test_a_turn_no_replica_confirms_is_a_503_naming_its_turn_id_and_a_retry_stores_it_once(
    tmp_path: Path, redis_server: RedisServer
) -> None:
    env = service_env(redis_server.url, ENGRAM_COMMIT_DURABILITY="replicated", ENGRAM_COMMIT_REPLICA_TIMEOUT_MS="50")
    service = ServiceProcess(env, tmp_path / "service.log").start()
    replica: RedisServer | None = None
    try:
        body = {"session_id": "s1", "message": "remember me", "turn_id": "turn-1"}
        refused = httpx.post(service.url + "/v1/chat", json=body, timeout=10)
        assert refused.status_code == 503 and refused.headers["Retry-After"].isdigit()
        error = refused.json()["error"]
        assert error["code"] == "not_replicated" and error["turn_id"] == "turn-1"
        assert "not acknowledged" in error["message"] and "turn-1" in error["message"]

        with sync_redis.Redis(port=redis_server.port) as client:
            client.config_set("repl-diskless-sync-delay", 0)
        replica = RedisServer(
            tmp_path / "replica", None, *FAST_REPLICA, "--replicaof", "127.0.0.1", str(redis_server.port)
        )
        replica.start()
        with sync_redis.Redis(port=replica.port, decode_responses=True) as client:
            wait_until(lambda: client.info("replication")["master_link_status"] == "up", 10, "the replica to sync")
        # retried as a client would until a replica confirms within the (deliberately short) 50 ms
        retried = wait_until(
            lambda: (
                (answer := httpx.post(service.url + "/v1/chat", json=body, timeout=10)).status_code != 503 and answer
            ),
            10,
            "a retry a replica confirms",
        )
        assert retried.status_code == 200, retried.text
        history = httpx.get(service.url + "/v1/sessions/s1/messages", timeout=10).json()
        assert [m["content"] for m in history["messages"] if m["role"] == "user"] == ["remember me"]
    finally:
        service.stop()
        if replica is not None:
            replica.stop()
