"""Resharding under load, as a user sees it: a real ``engram serve`` in cluster mode (3 primaries, 3 replicas),
20 sessions x 20 turns at concurrency 10, and ``redis-cli --cluster reshard`` moving the slot that holds the
tenant's live sessions (with the slots before it) to another primary in the middle. Keys move with MIGRATE
while turns run: commands meet ASK and TRYAGAIN redirects, then MOVED once the slot has moved.

Turns run before, during and after the reshard (every session's last turn waits for it to end). Afterwards:
every request answered 200 (no error reaches a client), every acknowledged turn stored exactly
once and in order, on the new primary. Figures go to tests/artifacts/reliability/cluster-reshard-<durability>.json.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from redis.crc import key_slot

from engram.connections import key_space
from engram.llama_index import store_from_url
from engram.settings import Settings
from testkit.cluster import ClusterTopology
from tests.reliability.support import record
from tests.server.support import ServiceProcess, service_env
from tests.topologies.failover import TENANT, drive, provision, stored_figures

FILLER_SESSIONS = 2000


@pytest.mark.parametrize("durability", ["replicated", "local"])
async def test_moving_the_slot_of_live_sessions_loses_duplicates_and_fails_nothing(
    cluster: ClusterTopology, tmp_path: Path, durability: str
) -> None:
    settings = Settings(redis_mode="cluster", redis_url=cluster.seed)
    credentials = await provision(settings)
    filler = store_from_url(cluster.url)
    try:
        for n in range(FILLER_SESSIONS):
            await filler.commit_turn(TENANT, f"filler-{n}", "t0", "an older conversation", "kept")
    finally:
        await filler.client.aclose()
    slot = key_slot(key_space(settings).session_index(TENANT).encode())
    source = cluster.primary_of_slot(slot)
    target = next(node for node in cluster.primaries() if node is not source)
    # redis-cli moves the source's lowest slots first: enough of them to take the tenant's slot along
    count = sorted(cluster.slots_of(source)).index(slot) + 1
    moved: dict[str, float] = {}

    def reshard() -> None:
        started = time.monotonic()
        cluster.cli(
            "--cluster", "reshard", f"127.0.0.1:{source.port}",
            "--cluster-from", cluster.node_id(source), "--cluster-to", cluster.node_id(target),
            "--cluster-slots", str(count), "--cluster-yes",
        )  # fmt: skip
        moved["reshard_s"] = round(time.monotonic() - started, 3)

    env = service_env(
        cluster.seed, ENGRAM_AUTH="required", ENGRAM_REDIS_MODE="cluster", ENGRAM_COMMIT_DURABILITY=durability
    )
    service = ServiceProcess(env, tmp_path / "service.log").start()
    try:
        load = await drive(
            service.url, credentials.api_key, reshard, disruption_seconds=60, deadline=90, last_turns_after=True
        )
    finally:
        service.stop()

    assert cluster.primary_of_slot(slot) is target  # the live slot did move
    assert load.killed_at is not None and load.disrupted_at is not None
    during = [t for t, _, _ in load.answers if load.killed_at < t < load.disrupted_at]
    failures = [(status, code) for _, status, code in load.answers if status != 200]
    store = store_from_url(cluster.url)
    try:
        stored = await stored_figures(store, load)
    finally:
        await store.client.aclose()
    figures = {
        **moved,
        "slots_moved": count,
        "acknowledged_turns": load.count(),
        "answers_during_reshard": len(during),
        "answers_not_200": len(failures),
        **{f"acknowledged_turns_{name}": value for name, value in stored.items()},
        "load_s": round(time.monotonic() - load.started, 3),
        "durability": durability,
    }
    record(f"cluster-reshard-{durability}", **figures)
    print(f"cluster reshard, commits {durability}: {figures}")
    assert failures == [], figures
    assert stored == {"lost": 0, "duplicated": 0, "out_of_order": 0}, figures
