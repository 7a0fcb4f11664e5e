"""What a failover test drives and checks, for every topology (Sentinel, Cluster): 20 sessions x 20 turns at
concurrency 10 against a real ``engram serve``, clients retrying 503 with the same turn id (honouring
Retry-After), a node killed in the middle; then what the clients saw and what is stored."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import httpx

from engram.connections import key_space
from engram.errors import NotReplicated
from engram.history import HistoryStore
from engram.llama_index import store_from_url
from engram.messages import CommittedTurn
from engram.policy import Policy
from engram.settings import Settings
from engram.tenancy import acl
from engram.tenancy.nodes import RedisNodes
from engram.tenancy.provision import Credentials, TenantSpec, ensure_tenant, record_for
from testkit.sentinel import Node

SESSIONS, TURNS, CONCURRENCY = 20, 20, 10
KILL_AFTER_ACKNOWLEDGED = 120  # turns acknowledged before the primary is killed
REQUEST_TIMEOUT = 10.0  # seconds: no request may hang
LOAD_DEADLINE = 45.0  # seconds for the whole load, failover included
TENANT = "acme"


@dataclass
class Load:
    """What the clients saw."""

    started: float = field(default_factory=time.monotonic)
    acknowledged: dict[str, list[str]] = field(default_factory=dict)  # session -> turn ids acknowledged, in order
    answers: list[tuple[float, int, str]] = field(default_factory=list)  # (time, status, error code)
    killed_at: float | None = None
    disrupted_at: float | None = None  # when the disruption (kill, reshard) had finished
    enough: asyncio.Event = field(default_factory=asyncio.Event)
    # set: every session's last turn waits for the disruption to end (so turns run before, during and after)
    disrupted: asyncio.Event | None = None

    def count(self) -> int:
        return sum(len(turns) for turns in self.acknowledged.values())


async def converse(client: httpx.AsyncClient, load: Load, session: str) -> None:
    for n in range(TURNS):
        if n == TURNS - 1 and load.disrupted is not None:
            await load.disrupted.wait()
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


async def drive(
    url: str,
    api_key: str,
    disrupt: Callable[[], None],
    *,
    disruption_seconds: float = 1.0,
    deadline: float = LOAD_DEADLINE,
    last_turns_after: bool = False,
) -> Load:
    """Run the load; once KILL_AFTER_ACKNOWLEDGED turns are acknowledged, ``disrupt`` (kill a node, reshard)
    runs in a thread while the load goes on. Both are bounded: ``deadline``, ``disruption_seconds``. With
    ``last_turns_after`` every session's last turn waits until ``disrupt`` has returned."""
    load = Load(disrupted=asyncio.Event() if last_turns_after else None)
    slots = asyncio.Semaphore(CONCURRENCY)
    headers = {"Authorization": f"Bearer {api_key}"}

    async def one(session: str) -> None:
        async with slots:
            await converse(client, load, session)

    async def disruption() -> None:
        await load.enough.wait()
        load.killed_at = time.monotonic()
        try:
            await asyncio.to_thread(disrupt)
        finally:
            load.disrupted_at = time.monotonic()
            if load.disrupted is not None:
                load.disrupted.set()

    async with httpx.AsyncClient(base_url=url, headers=headers) as client:
        disrupting = asyncio.create_task(disruption())
        try:
            await asyncio.wait_for(asyncio.gather(*(one(f"s{i:02d}") for i in range(SESSIONS))), deadline)
        finally:
            if not load.enough.is_set():
                disrupting.cancel()
        await asyncio.wait_for(disrupting, disruption_seconds)
    return load


def commits_by_node(samples: dict[tuple[str, frozenset[tuple[str, str]]], float]) -> dict[str, float]:
    """``engram_redis_commits_total`` as scraped: turns committed, by the node that was the primary."""
    return {
        dict(labels)["node"]: value for (name, labels), value in samples.items() if name == "engram_redis_commits_total"
    }


def check_commits_moved(commits: dict[str, float], old_primary: str, load: Load, figures: dict[str, object]) -> None:
    """/metrics tells which node took the commits: the killed primary before the kill, another node after
    (the promoted one; after a second, unplanned failover on a loaded machine, more than one), and every
    acknowledged turn was counted once (a retry answered from the store is not a commit, hence ``>=``)."""
    seen = f"commits by node {commits}; {figures}"
    assert commits.get(old_primary, 0) > 0, seen
    assert any(count > 0 for node, count in commits.items() if node != old_primary), seen
    assert sum(commits.values()) >= load.count() - int(figures["answers_503"] or 0), seen


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


async def stored_figures(store: HistoryStore, load: Load) -> dict[str, int]:
    """Acknowledged turns lost, duplicated, and sessions out of order, as ``store`` holds them now; every pair
    (user message, reply) must be adjacent and every session must have been answered in full."""
    lost, duplicated, out_of_order = 0, 0, 0
    for session, acknowledged in sorted(load.acknowledged.items()):
        assert acknowledged == [f"{session}-t{n}" for n in range(TURNS)]
        messages = await store.all_messages(TENANT, session)
        stored = [m.turn_id for m in messages if m.role == "user"]
        assert [m.role for m in messages] == ["user", "assistant"] * len(stored)  # pairs stay adjacent
        assert all(m.turn_id == stored[i // 2] for i, m in enumerate(messages))
        lost += len(set(acknowledged) - set(stored))
        duplicated += len(stored) - len(set(stored))
        out_of_order += stored != sorted(stored, key=acknowledged.index)
    return {"lost": lost, "duplicated": duplicated, "out_of_order": out_of_order}


async def provision(settings: Settings, credentials: Credentials | None = None) -> Credentials:
    """The tenant, as `engram tenant create` (or the operator, or its drift repair when ``credentials`` are
    given) makes it: registry record, function library, ACL user on every node the topology has now."""
    keys = key_space(settings)
    credentials = credentials or Credentials.generate(TENANT)
    nodes = RedisNodes.from_settings(settings)
    try:
        spec = TenantSpec(TENANT, Policy(token_limit=500))
        await ensure_tenant(nodes, keys, record_for(keys, spec, credentials, owner="cli"))
    finally:
        await nodes.aclose()
    return credentials


async def repair(settings: Settings, credentials: Credentials) -> None:
    """What the operator's drift repair does on its timer: ensure the tenant on every node there is now."""
    await provision(settings, credentials)


def tenant_user_nodes(nodes: list[Node]) -> list[int]:
    """The ports of the running nodes where the tenant's ACL user exists."""
    username = acl.acl_username(key_space(Settings()), TENANT)
    found = []
    for node in nodes:
        if node.running:
            with node.client() as client:
                if client.acl_getuser(username):
                    found.append(node.port)
    return found


async def commit_as_tenant(url: str, username: str, password: str, durability: str) -> CommittedTurn:
    """One turn with the tenant's own ACL user. With ``replicated`` a replica may still be re-syncing to the
    new primary for a moment (NotReplicated, 503 to a client): retried with the same turn id, as a client would."""
    store = store_from_url(url, redis_username=username, redis_password=password, commit_durability=durability)
    deadline = time.monotonic() + 15
    try:
        while True:
            try:
                return await store.commit_turn(TENANT, "tenant-user", "t1", "as the tenant", "after the failover")
            except NotReplicated:
                if time.monotonic() > deadline:
                    raise
                await asyncio.sleep(0.1)
    finally:
        await store.client.aclose()
