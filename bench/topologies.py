"""Per-turn cost and Redis round trips of Engram in each Redis topology and commit durability, in one run.

Three topologies start side by side on this machine (Debian's redis-server and redis-sentinel, testkit's
settings for all: no AOF, no RDB, replicas in sync): `standalone` is a primary with 2 replicas that the
client addresses directly (ENGRAM_REDIS_MODE=standalone); `sentinel` is a primary with 2 replicas and 3
Sentinels, addressed through the Sentinels (ENGRAM_REDIS_MODE=sentinel, redis-py's Sentinel-managed pool);
`cluster` is a Redis Cluster of 3 primaries with a replica each (testkit.cluster, `redis-cli --cluster
create`), addressed through a seed node (ENGRAM_REDIS_MODE=cluster, redis-py's asyncio RedisCluster, keys
in the tenant's hash slot). So standalone and sentinel differ by the Sentinel client path, not the servers;
cluster adds the cluster client and cluster-enabled servers. The replicas give ENGRAM_COMMIT_DURABILITY=
replicated (WAIT 1 pipelined with the commit, on the slot's node in a cluster) a replica to wait for. The
six contenders (topology × durability) are Engram's turn as one replica process runs it (load the window +
commit the turn, tail cache on, the `engram-hit` case of bench.turn_cost), at each size, all interleaved
turn by turn.

Round trips are counted at the client: every write of one or more commands to any Redis process
(primary, Sentinel or any cluster node) that is followed by reading their replies is one round trip (a
pipeline is one). Commands are counted on the node that serves the session (MONITOR, as bench.turn_cost
does; in a cluster the primary of the session's slot): with `replicated` the commit's WAIT is a third
command in the commit's round trip.

    python -m bench.topologies                                          # the full run (make bench)
    python -m bench.topologies --sizes 100 --turns 3 --json /tmp/t.json  # a smoke run
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import redis
from redis.asyncio.connection import AbstractConnection
from redis.crc import key_slot

from bench.contenders import TOKEN_LIMIT, TTL_SECONDS, Turn, message_text, role
from bench.turn_cost import measure, monitored_commands, p99
from engram.connections import create_redis, key_space
from engram.history import HistoryStore
from engram.messages import NewMessage
from engram.policy import Policy
from engram.settings import Settings
from testkit.cluster import ClusterTopology
from testkit.sentinel import SentinelTopology

ROOT = Path(__file__).resolve().parents[1]
TOPOLOGIES = ("standalone", "sentinel", "cluster")
DURABILITIES = ("local", "replicated")
CONTENDERS = tuple(f"{t}/{d}" for t in TOPOLOGIES for d in DURABILITIES)
REFERENCE = "standalone/local"
REPLICAS, SENTINELS = 2, 3
CLUSTER_PRIMARIES, CLUSTER_REPLICAS = 3, 1  # replicas per primary
TENANT = "bench"
WARM_UP_TURNS = 5
COUNTED_TURNS = 5


@dataclass
class Row:
    size: int
    contender: str
    topology: str
    durability: str
    turns: int = 0
    median_ms: float | None = None
    p99_ms: float | None = None
    ratio: float | None = None  # median / standalone/local's median at the same size
    round_trips: float | None = None  # per turn, to any Redis process (client side)
    sentinel_round_trips: float | None = None  # the part of them that went to a Sentinel
    commands: float | None = None  # per turn, sent to the primary serving the session (MONITOR)
    node: int | None = None  # that primary's port (in a cluster: the primary of the session's slot)
    window_messages: int | None = None


class RoundTrips:
    """Counts, while on, each send of one or more commands by any redis-py asyncio connection in this process
    (every send is followed by reading its replies: one round trip), by the port it went to."""

    def __init__(self) -> None:
        self.by_port: dict[int, int] = {}
        self.on = False

    @contextmanager
    def installed(self) -> Iterator[RoundTrips]:
        original = AbstractConnection.send_packed_command
        counter = self

        async def counted(connection: Any, command: Any, check_health: bool = True) -> None:
            if counter.on:
                port = int(getattr(connection, "port", 0) or 0)
                counter.by_port[port] = counter.by_port.get(port, 0) + 1
            await original(connection, command, check_health)

        AbstractConnection.send_packed_command = counted  # type: ignore[method-assign]
        try:
            yield self
        finally:
            AbstractConnection.send_packed_command = original  # type: ignore[method-assign]


async def engram_commands(run: Callable[[int], Awaitable[None]], port: int, first_n: int, turns: int) -> float:
    """Commands Engram's clients (client name `engram`) sent the primary per turn (MONITOR; Lua's own calls
    excluded). Unlike bench.turn_cost's count, the Sentinels' and replicas' own traffic to the primary
    (PING, INFO, PUBLISH, REPLCONF) is left out: it is told apart by the client's name in CLIENT LIST."""
    seen = await monitored_commands(run, port, first_n, turns)
    with redis.Redis(port=port, decode_responses=True) as client:
        engram = {c["addr"] for c in client.client_list() if c.get("name") == "engram"}
    return sum(1 for address, _ in seen if address in engram) / turns


def slot_of(key: str) -> int:
    """The cluster hash slot of ``key`` (its hash tag's, when it has one)."""
    return int(key_slot(key.encode()))


def settings_for(topology: str, durability: str, urls: dict[str, str]) -> Settings:
    """``urls``: the standalone primary's URL, the Sentinels (host:port,...) and the cluster's seed node."""
    if topology == "sentinel":
        return Settings(redis_mode="sentinel", redis_sentinels=urls["sentinel"], commit_durability=durability)
    if topology == "cluster":
        return Settings(redis_mode="cluster", redis_url=urls["cluster"], commit_durability=durability)
    return Settings(redis_url=urls["standalone"], commit_durability=durability)


async def build(settings: Settings, size: int, session: str) -> tuple[Turn, HistoryStore]:
    """One session of `size` messages and one replica process's store (cache on), warmed up."""
    policy = Policy(token_limit=TOKEN_LIMIT, session_ttl_seconds=TTL_SECONDS, max_messages_per_session=size)
    seeder = HistoryStore(create_redis(settings), key_space(settings), cache_sessions=0)
    for start in range(0, size, 500):
        batch = [NewMessage(role(n), message_text(n)) for n in range(start, min(size, start + 500))]
        await seeder.append(TENANT, session, batch, policy)
    await seeder.client.aclose()
    store = HistoryStore(
        create_redis(settings),
        key_space(settings),
        cache_sessions=10,
        commit_durability=settings.commit_durability,
        commit_replica_timeout_ms=settings.commit_replica_timeout_ms,
    )
    window = await store.load_window(TENANT, session, TOKEN_LIMIT)

    async def turn(n: int) -> None:
        await store.load_window(TENANT, session, TOKEN_LIMIT, policy=policy)
        await store.commit_turn(TENANT, session, f"t{n}", message_text(n), message_text(n + 1), policy)

    for n in range(WARM_UP_TURNS):  # connections open, the commit's pipeline used once
        await turn(-1 - n)
    return Turn(turn, window_messages=len(window.messages)), store


async def run(sizes: list[int], count: int, budget_s: float, directory: Path) -> dict[str, Any]:
    load_before = os.getloadavg()
    standalone = SentinelTopology(directory / "standalone", replicas=REPLICAS, sentinels=0)
    sentinel = SentinelTopology(directory / "sentinel", replicas=REPLICAS, sentinels=SENTINELS)
    cluster = ClusterTopology(directory / "cluster", primaries=CLUSTER_PRIMARIES, replicas_per_primary=CLUSTER_REPLICAS)
    stores: list[HistoryStore] = []
    try:
        standalone.start()
        sentinel.start()
        cluster.start()
        # The primary serving the benchmark's sessions (in the cluster: every key of tenant `bench` is in
        # the slot of its hash tag, so one primary serves all of them).
        primary_port = {
            "standalone": standalone.nodes[0].port,
            "sentinel": sentinel.primary().port,
            "cluster": cluster.primary_of_slot(slot_of(f"{{{TENANT}}}")).port,
        }
        sentinel_ports = {node.port for node in sentinel.sentinels}
        urls = {
            "standalone": f"redis://127.0.0.1:{primary_port['standalone']}/0",
            "sentinel": sentinel.sentinel_addresses,
            "cluster": cluster.seed,
        }
        rows: dict[tuple[int, str], Row] = {}
        turns: dict[tuple[int, str], Turn] = {}
        for size in sizes:
            for name in CONTENDERS:
                topology, durability = name.split("/")
                settings = settings_for(topology, durability, urls)
                session = f"{topology}-{durability}-{size}"
                turn, store = await build(settings, size, session)
                if topology == "cluster":  # the session is where its keys' hash tag says
                    log_key = key_space(settings).session(TENANT, session).log
                    assert cluster.primary_of_slot(slot_of(log_key)).port == primary_port["cluster"], log_key
                stores.append(store)
                turns[(size, name)] = turn
                rows[(size, name)] = Row(
                    size, name, topology, durability, window_messages=turn.window_messages, node=primary_port[topology]
                )
        samples = await measure(turns, count, budget_s)
        counter = RoundTrips()
        with counter.installed():
            for key, values in samples.items():
                row, turn = rows[key], turns[key]
                row.turns, row.median_ms, row.p99_ms = len(values), statistics.median(values), p99(values)
                counter.by_port.clear()
                counter.on = True
                for n in range(COUNTED_TURNS):
                    await turn.run(count + 10 + n)
                counter.on = False
                row.round_trips = sum(counter.by_port.values()) / COUNTED_TURNS
                to_sentinels = sum(v for port, v in counter.by_port.items() if port in sentinel_ports)
                row.sentinel_round_trips = to_sentinels / COUNTED_TURNS
                row.commands = await engram_commands(turn.run, primary_port[row.topology], count + 100, COUNTED_TURNS)
        for (size, _), row in rows.items():
            reference = rows[(size, REFERENCE)].median_ms
            row.ratio = row.median_ms / reference if row.median_ms and reference else None
            print(
                f"{size:>6} {row.contender:<22} n={row.turns:<4} median {row.median_ms:8.3f} ms"
                f"  p99 {row.p99_ms:8.3f} ms  {row.ratio:5.2f}x  round trips {row.round_trips:4.1f}"
                f" (to Sentinels {row.sentinel_round_trips:.1f})  commands {row.commands:4.1f}",
                flush=True,
            )
        replicas = {}
        for name, nodes in (("standalone", standalone), ("sentinel", sentinel), ("cluster", cluster)):
            with nodes.node_on(primary_port[name]).client() as client:
                replicas[name] = int(client.info("replication")["connected_slaves"])
    finally:
        for store in stores:
            await store.client.aclose()
        cluster.stop()
        sentinel.stop()
        standalone.stop()
    return {
        "setup": (
            f"standalone: 1 primary + {REPLICAS} replicas, addressed directly; sentinel: 1 primary + {REPLICAS} "
            f"replicas + {SENTINELS} Sentinels, addressed through the Sentinels; cluster: {CLUSTER_PRIMARIES} "
            f"primaries + {CLUSTER_REPLICAS} replica each (Redis Cluster), addressed through a seed node, the "
            "sessions on the primary of their tenant's hash slot; same redis-server settings everywhere (no AOF, "
            "no RDB); all on this machine over loopback"
        ),
        "sizes": sizes,
        "turns": count,
        "counted_turns": COUNTED_TURNS,
        "replicas": replicas,
        "rows": [asdict(row) for row in rows.values()],
        "load_before": list(load_before),
        "load_after": list(os.getloadavg()),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="100,1000", help="history lengths (messages)")
    parser.add_argument("--turns", type=int, default=1000, help="turns per contender and size")
    parser.add_argument("--budget", type=float, default=20.0, help="seconds a contender may spend per size")
    parser.add_argument("--json", type=Path, default=ROOT / "bench" / "results" / "topologies.json")
    args = parser.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        result = asyncio.run(run(sizes, args.turns, args.budget, Path(tmp)))
    result["wall_s"] = round(time.perf_counter() - started, 1)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=1))
    print(f"wrote {args.json} after {result['wall_s']} s")


if __name__ == "__main__":
    main()
