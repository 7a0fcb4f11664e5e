"""Engram on a real Redis Cluster (3 primaries, 3 replicas): what the history contract tests (tests/history, run
on a cluster too) do not show. A turn's round trips, counted on every primary; tenant isolation by ACL on every
node, replicas included; the function library back on a primary that lost it; and a slot caught mid-migration,
step by step as ``redis-cli --cluster reshard`` takes it."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from contextlib import ExitStack

import pytest
import redis
from redis.crc import key_slot

from engram.connections import key_space
from engram.errors import StoreUnavailable
from engram.history import HistoryStore
from engram.history.functions import LIBRARY_NAME
from engram.llama_index import store_from_url
from engram.policy import Policy
from engram.settings import Settings, get_settings
from engram.tenancy import acl
from engram.tenancy.cli import EXIT_OK, main
from engram.tenancy.nodes import RedisNodes
from engram.tenancy.provision import Credentials, TenantSpec, ensure_tenant, record_for
from testkit.cluster import ClusterTopology
from testkit.monitor import commands_run
from testkit.sentinel import Node

TENANTS = ("acme", "umbrella")


def settings_of(cluster: ClusterTopology) -> Settings:
    return Settings(redis_mode="cluster", redis_url=cluster.seed)


def tenant_slot(cluster: ClusterTopology, tenant: str) -> int:
    return key_slot(key_space(settings_of(cluster)).session_index(tenant).encode())


@pytest.fixture
async def store(redis_cluster: ClusterTopology) -> AsyncIterator[HistoryStore]:
    history = store_from_url(redis_cluster.url)
    yield history
    await history.client.aclose()


@pytest.mark.parametrize("durability", ["local", "replicated"])
async def test_a_turn_is_two_round_trips_to_the_sessions_primary_and_nothing_to_any_other_primary(
    redis_cluster: ClusterTopology, durability: str
) -> None:
    store = store_from_url(redis_cluster.url, commit_durability=durability)
    policy = Policy(requests_per_second=100, max_sessions=10, max_stored_bytes=1_000_000)
    try:
        for n in range(3):  # warm up: slot map, connections, the library
            await store.load_window("acme", "s1", 3000, policy=policy)
            await store.commit_turn("acme", "s1", f"warm{n}", "q", "a", policy)
        with ExitStack() as stack:
            # (the primaries: a replica's MONITOR shows what its primary replicates to it)
            seen = {node.port: stack.enter_context(commands_run(node.port)) for node in redis_cluster.primaries()}
            await store.load_window("acme", "s1", 3000, policy=policy)
            await store.commit_turn("acme", "s1", "counted", "q", "a", policy)
    finally:
        await store.client.aclose()
    primary = redis_cluster.primary_of_slot(tenant_slot(redis_cluster, "acme"))
    wait = ["WAIT"] if durability == "replicated" else []
    assert seen.pop(primary.port) == ["FCALL", "FCALL", *wait]  # load; commit (+ WAIT in its round trip)
    assert all(commands == [] for commands in seen.values()), seen


async def provision(cluster: ClusterTopology) -> dict[str, Credentials]:
    """The tenants, as `engram tenant create` or the operator make them: users on every node there is now."""
    return await provision_again(cluster, {tenant: Credentials.generate(tenant) for tenant in TENANTS})


async def provision_again(cluster: ClusterTopology, credentials: dict[str, Credentials]) -> dict[str, Credentials]:
    """What the operator's drift repair does: ensure every tenant on every node there is now."""
    settings = settings_of(cluster)
    keys = key_space(settings)
    nodes = RedisNodes.from_settings(settings)
    try:
        for tenant, secret in credentials.items():
            await ensure_tenant(nodes, keys, record_for(keys, TenantSpec(tenant, Policy()), secret, owner="cli"))
    finally:
        await nodes.aclose()
    return credentials


def as_tenant(node: Node, tenant: str, credentials: Credentials) -> redis.Redis:
    username = acl.acl_username(key_space(Settings()), tenant)
    return node.client(username=username, password=credentials.redis_password)


async def test_a_tenants_user_exists_on_every_node_and_reaches_only_its_own_keys_on_any(
    redis_cluster: ClusterTopology,
) -> None:
    credentials = await provision(redis_cluster)
    for tenant, secret in credentials.items():  # each tenant's own user works through the cluster client
        username = acl.acl_username(key_space(Settings()), tenant)
        own = store_from_url(redis_cluster.url, redis_username=username, redis_password=secret.redis_password)
        try:
            await own.commit_turn(tenant, "s1", "t1", f"I am {tenant}", "noted")
            assert [m.content for m in await own.all_messages(tenant, "s1")] == [f"I am {tenant}", "noted"]
        finally:
            await own.client.aclose()
    umbrella_log = key_space(settings_of(redis_cluster)).session("umbrella", "s1").log
    umbrella_node = redis_cluster.primary_of_slot(key_slot(umbrella_log.encode()))
    for node in redis_cluster.nodes:  # primaries and replicas: ACL users are not replicated, each has its own
        with as_tenant(node, "acme", credentials["acme"]) as acme:
            assert acme.ping()
            with pytest.raises(redis.exceptions.NoPermissionError):
                acme.xrange(umbrella_log)  # another tenant's key: refused, on the node that holds it or not
            for command in (("KEYS", "*"), ("SCAN", "0"), ("FLUSHALL",), ("FUNCTION", "FLUSH"), ("CLUSTER", "RESET")):
                with pytest.raises(redis.exceptions.NoPermissionError):
                    acme.execute_command(*command)
    with umbrella_node.client() as admin:
        assert admin.xlen(umbrella_log) == 2  # nothing of umbrella's was touched


async def test_a_primary_that_lost_the_library_gets_it_back_on_the_next_turn(
    redis_cluster: ClusterTopology, store: HistoryStore
) -> None:
    await store.commit_turn("acme", "s1", "t1", "before", "ok")
    primary = redis_cluster.primary_of_slot(tenant_slot(redis_cluster, "acme"))
    with primary.client() as client:
        client.function_flush()  # e.g. a primary restarted from an empty disk
        assert client.function_list() == []
    await store.commit_turn("acme", "s1", "t2", "after", "ok")
    for node in redis_cluster.primaries():
        with node.client() as client:
            assert [entry[1] for entry in client.function_list()] == [LIBRARY_NAME]
    assert [m.content for m in await store.all_messages("acme", "s1")] == ["before", "ok", "after", "ok"]


class SlotMove:
    """One slot moved by hand from ``source`` to ``target``, the steps ``redis-cli --cluster reshard`` takes."""

    def __init__(self, cluster: ClusterTopology, slot: int) -> None:
        self.cluster, self.slot = cluster, slot
        self.source = cluster.primary_of_slot(slot)
        self.target = next(node for node in cluster.primaries() if node is not self.source)
        self.finished = False

    def begin(self) -> None:
        with self.target.client() as target, self.source.client() as source:
            target.execute_command("CLUSTER", "SETSLOT", self.slot, "IMPORTING", self.cluster.node_id(self.source))
            source.execute_command("CLUSTER", "SETSLOT", self.slot, "MIGRATING", self.cluster.node_id(self.target))

    def migrate(self, keys: list[str]) -> None:
        with self.source.client() as source:
            source.execute_command("MIGRATE", "127.0.0.1", self.target.port, "", 0, 5000, "KEYS", *keys)

    def keys_left(self) -> list[str]:
        with self.source.client() as source:
            return list(source.execute_command("CLUSTER", "GETKEYSINSLOT", self.slot, 10_000))

    def finish(self) -> None:
        if self.finished:
            return
        if left := self.keys_left():
            self.migrate(left)
        target_id = self.cluster.node_id(self.target)
        for node in (self.target, self.source, *self.cluster.primaries()):
            with node.client() as client:
                client.execute_command("CLUSTER", "SETSLOT", self.slot, "NODE", target_id)
        self.cluster.wait_healthy()
        self.finished = True


@pytest.fixture
def acme_slot_move(redis_cluster: ClusterTopology) -> Iterator[SlotMove]:
    move = SlotMove(redis_cluster, tenant_slot(redis_cluster, "acme"))
    yield move
    move.finish()  # (also when the test failed: the shared cluster must be whole again)


@pytest.mark.parametrize("durability", ["local", "replicated"])
@pytest.mark.parametrize("moved", ["the log", "every key"])
async def test_a_turn_meeting_its_slot_mid_migration_waits_then_fails_whole_and_its_retry_stores_it_once(
    redis_cluster: ClusterTopology, acme_slot_move: SlotMove, durability: str, moved: str
) -> None:
    """While a slot migrates, a call on several keys is refused (TRYAGAIN) on the source when some of them
    moved and on the target when some do not exist yet (a commit creates keys): it runs only once the slot
    has moved. ``redis-cli --cluster reshard`` finishes a slot right after its keys, so the store waits
    (MIGRATION_PATIENCE_SECONDS); a slot left half-moved costs a 503 and nothing is half written."""
    store = store_from_url(redis_cluster.url, commit_durability=durability)
    keys = key_space(settings_of(redis_cluster))
    try:
        await store.commit_turn("acme", "s1", "t1", "first", "ok")
        acme_slot_move.begin()
        acme_slot_move.migrate([keys.session("acme", "s1").log] if moved == "the log" else acme_slot_move.keys_left())
        with pytest.raises(StoreUnavailable):  # after the store's patience
            await store.commit_turn("acme", "s1", "t2", "second", "ok")
        acme_slot_move.finish()
        committed = await store.commit_turn("acme", "s1", "t2", "second", "ok")  # the client's retry
        assert not committed.duplicate  # nothing of the refused call was written
        contents = [m.content for m in await store.all_messages("acme", "s1")]
        assert contents == ["first", "ok", "second", "ok"]
    finally:
        await store.client.aclose()


def test_engram_tenant_on_a_cluster_sets_users_on_every_node_and_purges_every_key(
    redis_cluster: ClusterTopology, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("ENGRAM_REDIS_MODE", "cluster")
    monkeypatch.setenv("ENGRAM_REDIS_URL", redis_cluster.seed)
    get_settings.cache_clear()
    try:
        assert main(["tenant", "create", "acme"]) == EXIT_OK
        assert main(["tenant", "create", "umbrella"]) == EXIT_OK
        assert capsys.readouterr().out.split()[0].startswith("egk_acme.")  # acme's API key
        username = acl.acl_username(key_space(Settings()), "acme")
        for node in redis_cluster.nodes:
            with node.client() as client:
                assert client.acl_getuser(username), node.port

        async def write() -> None:
            store = store_from_url(redis_cluster.url)
            try:
                for tenant in TENANTS:
                    for n in range(5):
                        await store.commit_turn(tenant, f"s{n}", "t1", "hello", "hi")
            finally:
                await store.client.aclose()

        asyncio.run(write())
        assert main(["tenant", "delete", "acme", "--purge"]) == EXIT_OK
        assert "purged 5 sessions" in capsys.readouterr().err
        for node in redis_cluster.primaries():
            with node.client() as client:
                assert client.keys("engram:acme:*") == []  # SCAN ran on every primary
        for node in redis_cluster.nodes:
            with node.client() as client:
                assert client.execute_command("ACL", "GETUSER", username) is None
        umbrella = redis_cluster.primary_of_slot(tenant_slot(redis_cluster, "umbrella"))
        with umbrella.client() as client:
            assert len(client.keys("engram:umbrella:*")) > 5  # the other tenant is untouched
    finally:
        get_settings.cache_clear()


async def test_a_primary_added_to_the_cluster_gets_the_library_and_the_tenants_users(cluster: ClusterTopology) -> None:
    """A node added with ``redis-cli --cluster add-node`` and given the tenant's slot: the next turn there runs
    (the library is loaded on it if it lacks it) and the drift repair gives it the tenants' ACL users."""
    credentials = await provision(cluster)
    store = store_from_url(cluster.url)
    try:
        await store.commit_turn("acme", "s1", "t1", "before", "ok")
        added = cluster.add_primary()
        slot = tenant_slot(cluster, "acme")
        source = cluster.primary_of_slot(slot)
        count = sorted(cluster.slots_of(source)).index(slot) + 1  # the source's lowest slots, up to acme's
        cluster.cli(
            "--cluster", "reshard", f"127.0.0.1:{source.port}", "--cluster-from", cluster.node_id(source),
            "--cluster-to", cluster.node_id(added), "--cluster-slots", str(count), "--cluster-yes",
        )  # fmt: skip
        cluster.wait_healthy()
        assert cluster.primary_of_slot(slot) is added
        await store.commit_turn("acme", "s1", "t2", "after", "ok")
        assert [m.content for m in await store.all_messages("acme", "s1")] == ["before", "ok", "after", "ok"]
    finally:
        await store.client.aclose()
    with added.client() as client:
        assert [entry[1] for entry in client.function_list()] == [LIBRARY_NAME]
    username = acl.acl_username(key_space(Settings()), "acme")
    with added.client() as client:
        assert not client.acl_getuser(username)  # ACL users are not replicated, nor copied by add-node
    await provision_again(cluster, credentials)
    with as_tenant(added, "acme", credentials["acme"]) as acme:
        assert acme.xlen(key_space(settings_of(cluster)).session("acme", "s1").log) == 4
