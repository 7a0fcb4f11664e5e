"""A Sentinel failover as a user sees it: a real ``engram serve`` in sentinel mode, 20 sessions x 20 turns at
concurrency 10, and the primary killed with SIGKILL in the middle (1 primary, 2 replicas, 3 Sentinels).

Clients retry 503 with the same turn id, honouring Retry-After. Afterwards: never a 500, no request
without an answer (every request has a timeout), and with ``replicated`` every acknowledged turn is
stored exactly once and in order; with ``local`` the acknowledged turns a failover lost are counted. The
tenant's own ACL user works on the promoted primary, which has the function library, and the killed
primary, started again, rejoins as a replica (and gets the tenant's user back from the drift repair).
The figures go to tests/artifacts/reliability/sentinel-failover-<durability>.json.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest

from engram.errors import NotReplicated
from engram.history import HistoryStore
from engram.history.functions import LIBRARY_NAME
from engram.llama_index import store_from_url
from engram.messages import CommittedTurn
from engram.policy import Policy
from engram.redis_keys import KeySpace
from engram.settings import Settings
from engram.tenancy import acl
from engram.tenancy.nodes import RedisNodes
from engram.tenancy.provision import Credentials, TenantSpec, ensure_tenant, record_for
from testkit.sentinel import SentinelTopology, wait_until
from tests.reliability.support import record
from tests.server.support import ServiceProcess, metric, scrape, service_env

SESSIONS, TURNS, CONCURRENCY = 20, 20, 10
KILL_AFTER_ACKNOWLEDGED = 120  # turns acknowledged before the primary is killed
REQUEST_TIMEOUT = 10.0  # seconds: no request may hang
LOAD_DEADLINE = 45.0  # seconds for the whole load, failover included
TENANT = "acme"


@pytest.fixture
def topology(tmp_path: Path) -> Iterator[SentinelTopology]:
    nodes = SentinelTopology(tmp_path / "redis").start()
    yield nodes
    nodes.stop()


@dataclass
class Load:
    """What the clients saw."""

    started: float = field(default_factory=time.monotonic)
    acknowledged: dict[str, list[str]] = field(default_factory=dict)  # session -> turn ids acknowledged, in order
    answers: list[tuple[float, int, str]] = field(default_factory=list)  # (time, status, error code)
    killed_at: float | None = None
    enough: asyncio.Event = field(default_factory=asyncio.Event)

    def count(self) -> int:
        return sum(len(turns) for turns in self.acknowledged.values())


async def converse(client: httpx.AsyncClient, load: Load, session: str) -> None:
    for n in range(TURNS):
        turn_id = f"{session}-t{n}"
        body = {"session_id": session, "message": f"message {n} of {session}", "turn_id": turn_id}
        while True:
            response = await client.post("/v1/chat", json=body, timeout=REQUEST_TIMEOUT)
            code = response.json().get("error", {}).get("code", "") if response.status_code != 200 else ""
            load.answers.append((time.monotonic(), response.status_code, code))
            if response.status_code == 200:
                assert response.json()["turn_id"] == turn_id
                load.acknowledged.setdefault(session, []).append(turn_id)
                if load.count() >= KILL_AFTER_ACKNOWLEDGED:
                    load.enough.set()
                break
            assert response.status_code == 503, response.text  # never a 500, nor any other failure
            assert response.headers["Retry-After"].isdigit()
            await asyncio.sleep(float(response.headers["Retry-After"]))


async def drive(url: str, api_key: str, topology: SentinelTopology) -> Load:
    load = Load()
    slots = asyncio.Semaphore(CONCURRENCY)
    headers = {"Authorization": f"Bearer {api_key}"}

    async def one(session: str) -> None:
        async with slots:
            await converse(client, load, session)

    async def kill_primary() -> None:
        await load.enough.wait()
        topology.primary().kill()
        load.killed_at = time.monotonic()

    async with httpx.AsyncClient(base_url=url, headers=headers) as client:
        killer = asyncio.create_task(kill_primary())
        await asyncio.wait_for(asyncio.gather(*(one(f"s{i:02d}") for i in range(SESSIONS))), LOAD_DEADLINE)
        await asyncio.wait_for(killer, 1)
    return load


def failover_figures(load: Load) -> dict[str, float | int | None]:
    assert load.killed_at is not None
    unavailable = [t for t, status, _ in load.answers if status == 503]
    first_503 = min(unavailable) if unavailable else None
    recovered = min((t for t, status, _ in load.answers if status == 200 and first_503 and t > first_503), default=None)
    codes: dict[str, int] = {}
    for _, status, code in load.answers:
        if status == 503:
            codes[code] = codes.get(code, 0) + 1
    return {
        "failover_window_s": round(recovered - first_503, 3) if first_503 and recovered else None,
        "kill_to_first_success_s": round(
            min(t for t, status, _ in load.answers if status == 200 and t > load.killed_at) - load.killed_at, 3
        ),
        "last_503_after_kill_s": round(max(unavailable) - load.killed_at, 3) if unavailable else None,
        "answers_503": len(unavailable),
        **{f"answers_503_{code}": count for code, count in sorted(codes.items())},
        "load_s": round(time.monotonic() - load.started, 3),
    }


async def provision(settings: Settings) -> Credentials:
    keys = KeySpace()
    credentials = Credentials.generate(TENANT)
    nodes = RedisNodes.from_settings(settings)
    try:
        spec = TenantSpec(TENANT, Policy(token_limit=500))
        await ensure_tenant(nodes, keys, record_for(keys, spec, credentials, owner="cli"))
    finally:
        await nodes.aclose()
    return credentials


async def repair(settings: Settings, credentials: Credentials) -> list[str]:
    """What the operator's drift repair does on its timer: ensure the tenant on every node there is now."""
    keys = KeySpace()
    nodes = RedisNodes.from_settings(settings)
    try:
        record_ = record_for(keys, TenantSpec(TENANT, Policy(token_limit=500)), credentials, owner="cli")
        return await ensure_tenant(nodes, keys, record_)
    finally:
        await nodes.aclose()


async def tenant_user_on_every_node(topology: SentinelTopology, credentials: Credentials) -> list[int]:
    """The ports of the nodes where the tenant's ACL user exists."""
    username = acl.acl_username(KeySpace(), TENANT)
    found = []
    for node in topology.nodes:
        if node.running:
            with node.client() as client:
                if client.acl_getuser(username):
                    found.append(node.port)
    return found


@pytest.mark.parametrize("durability", ["replicated", "local"])
async def test_a_killed_primary_costs_a_short_503_window_and_no_acknowledged_turn_when_replicated(
    topology: SentinelTopology, tmp_path: Path, durability: str
) -> None:
    settings = Settings(redis_mode="sentinel", redis_sentinels=topology.sentinel_addresses)
    credentials = await provision(settings)
    assert sorted(await tenant_user_on_every_node(topology, credentials)) == sorted(n.port for n in topology.nodes)

    env = service_env(
        "redis://127.0.0.1:1/0",  # unused in sentinel mode (only its database number and credentials)
        ENGRAM_AUTH="required",
        ENGRAM_REDIS_MODE="sentinel",
        ENGRAM_REDIS_SENTINELS=topology.sentinel_addresses,
        ENGRAM_COMMIT_DURABILITY=durability,
        ENGRAM_REDIS_SOCKET_TIMEOUT="2",
        ENGRAM_REDIS_CONNECT_TIMEOUT="1",
    )
    service = ServiceProcess(env, tmp_path / "service.log").start()
    old_primary = topology.primary()
    try:
        load = await drive(service.url, credentials.api_key, topology)
        samples = scrape(service.url)
    finally:
        service.stop()
    figures = failover_figures(load)
    new_port = topology.wait_failover(old_primary.port)
    # /metrics tells which node took the commits: the old primary before the kill, the promoted one after
    commits_on = {
        port: metric(samples, "engram_redis_commits_total", node=f"127.0.0.1:{port}")
        for port in (old_primary.port, new_port)
    }
    assert all(count > 0 for count in commits_on.values()), commits_on
    assert sum(commits_on.values()) >= load.count() - figures["answers_503"], commits_on  # (retries may replay)
    figures["failovers"] = topology.failovers()

    # Every session answered all its turns; what is stored now, on the promoted primary:
    store = store_from_url(topology.url)
    lost, duplicated, out_of_order = 0, 0, 0
    try:
        for session, acknowledged in sorted(load.acknowledged.items()):
            assert acknowledged == [f"{session}-t{n}" for n in range(TURNS)]
            messages = await store.all_messages(TENANT, session)
            stored = [m.turn_id for m in messages if m.role == "user"]
            assert [m.role for m in messages] == ["user", "assistant"] * len(stored)  # pairs stay adjacent
            assert all(m.turn_id == stored[i // 2] for i, m in enumerate(messages))
            lost += len(set(acknowledged) - set(stored))
            duplicated += len(stored) - len(set(stored))
            out_of_order += stored != sorted(stored, key=acknowledged.index)
    finally:
        await store.client.aclose()
    seen = f"lost {lost}, duplicated {duplicated}, out of order {out_of_order}; {figures}"
    assert duplicated == 0 and out_of_order == 0, seen
    if durability == "replicated":
        assert lost == 0, seen  # (a second, unplanned failover, "failovers" > 1, is the one documented gap)

    # The promoted primary has the library and takes the tenant's own ACL user.
    with topology.node_on(new_port).client() as client:
        libraries = [dict(zip(entry[::2], entry[1::2], strict=True)) for entry in client.function_list()]
        assert LIBRARY_NAME in {library["library_name"] for library in libraries}
    username = acl.acl_username(KeySpace(), TENANT)
    as_tenant = store_from_url(
        topology.url, redis_username=username, redis_password=credentials.redis_password, commit_durability=durability
    )
    try:
        committed = await _commit_once_replicas_follow(as_tenant)
        assert [m.content for m in committed.messages] == ["as the tenant", "after the failover"]
    finally:
        await as_tenant.client.aclose()

    # The killed primary, started again as a start script would (a replica of the primary the Sentinels
    # name), follows the new primary, the Sentinels list it, and the drift repair gives it the tenant's
    # user (ACL users are not replicated, and this node has no aclfile).
    topology.restart_as_replica(old_primary)

    def rejoined() -> bool:
        with old_primary.client() as client:
            info = client.info("replication")
        return info["role"] == "slave" and int(info["master_port"]) == new_port and info["master_link_status"] == "up"

    wait_until(rejoined, 15, "the old primary to rejoin as a replica")
    topology.wait_settled(new_port, 2, 30)
    await repair(settings, credentials)
    assert old_primary.port in await tenant_user_on_every_node(topology, credentials)

    figures.update(durability=durability, acknowledged_turns=load.count(), acknowledged_turns_lost=lost)
    record(f"sentinel-failover-{durability}", **figures)
    print(f"sentinel failover, commits {durability}: {figures}")
    assert figures["failover_window_s"] is None or figures["failover_window_s"] < 15


async def _commit_once_replicas_follow(store: HistoryStore) -> CommittedTurn:
    """One turn as the tenant; with ``replicated`` a replica may still be re-syncing to the new primary for a
    moment (NotReplicated, 503 to a client), so it is retried with the same turn id, as a client would."""
    deadline = time.monotonic() + 15
    while True:
        try:
            return await store.commit_turn(TENANT, "tenant-user", "t1", "as the tenant", "after the failover")
        except NotReplicated:
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.1)
