"""The loss of a Redis Cluster primary as a user sees it: a real ``engram serve`` in cluster mode (3 primaries,
3 replicas, cluster-node-timeout 1 s), 20 sessions x 20 turns at concurrency 10, and the primary that serves
the tenant's slot killed with SIGKILL in the middle; its replica is promoted by the cluster itself, and the
killed node is started again once it was replaced, as its StatefulSet would restart the pod: it rejoins as
the new primary's replica. (With one replica per primary, the promoted primary has no replica until then:
``replicated`` commits of that shard answer 503 until a replica is back; ``local`` ones recover at promotion.)

Clients retry 503 with the same turn id, honouring Retry-After. Afterwards: never a 500, no request without
an answer, and with ``replicated`` every acknowledged turn is stored exactly once and in order; with
``local`` the acknowledged turns lost are counted. The promoted primary has the function library and takes
the tenant's own ACL user; the killed primary, started again, rejoins as a replica and gets the tenant's
user back from the drift repair (ACL users are not replicated). Figures go to
tests/artifacts/reliability/cluster-failover-<durability>.json.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from redis.crc import key_slot

from engram.connections import key_space
from engram.history.functions import LIBRARY_NAME
from engram.llama_index import store_from_url
from engram.settings import Settings
from engram.tenancy import acl
from testkit.cluster import ClusterTopology
from testkit.sentinel import Node, wait_until
from tests.reliability.support import record
from tests.server.support import ServiceProcess, scrape, service_env
from tests.topologies.failover import (
    TENANT,
    check_commits_moved,
    commit_as_tenant,
    commits_by_node,
    drive,
    failover_figures,
    provision,
    repair,
    stored_figures,
    tenant_user_nodes,
)


@pytest.mark.parametrize("durability", ["replicated", "local"])
async def test_a_killed_cluster_primary_costs_a_short_503_window_and_no_acknowledged_turn_when_replicated(
    cluster: ClusterTopology, tmp_path: Path, durability: str
) -> None:
    settings = Settings(redis_mode="cluster", redis_url=cluster.seed)
    credentials = await provision(settings)
    assert sorted(tenant_user_nodes(cluster.nodes)) == sorted(node.port for node in cluster.nodes)  # replicas too
    slot = key_slot(key_space(settings).session_index(TENANT).encode())
    old_primary = cluster.primary_of_slot(slot)

    env = service_env(
        cluster.seed,
        ENGRAM_AUTH="required",
        ENGRAM_REDIS_MODE="cluster",
        ENGRAM_COMMIT_DURABILITY=durability,
        ENGRAM_REDIS_SOCKET_TIMEOUT="2",
        ENGRAM_REDIS_CONNECT_TIMEOUT="1",
    )
    service = ServiceProcess(env, tmp_path / "service.log").start()
    promoted: list[Node] = []

    def kill_and_restart() -> None:
        killed = time.monotonic()
        old_primary.kill()
        promoted.append(cluster.wait_promoted(slot, old_primary))
        figures_at["promoted_after_kill_s"] = round(time.monotonic() - killed, 3)
        old_primary.spawn().wait_ready()

    figures_at: dict[str, float] = {}
    try:
        load = await drive(service.url, credentials.api_key, kill_and_restart, disruption_seconds=40, deadline=90)
        samples = scrape(service.url)
    finally:
        service.stop()
    figures = {**failover_figures(load), **figures_at}
    new_primary = promoted[0]
    check_commits_moved(commits_by_node(samples), f"127.0.0.1:{old_primary.port}", load, figures)

    store = store_from_url(cluster.url)
    try:
        stored = await stored_figures(store, load)
    finally:
        await store.client.aclose()
    seen = f"{stored}; {figures}"
    assert stored["duplicated"] == 0 and stored["out_of_order"] == 0, seen
    if durability == "replicated":
        assert stored["lost"] == 0, seen

    # The promoted primary has the library (replicated to it before the kill).
    with new_primary.client() as client:
        libraries = [dict(zip(entry[::2], entry[1::2], strict=True)) for entry in client.function_list()]
        assert LIBRARY_NAME in {library["library_name"] for library in libraries}

    # The killed primary, started again, rejoins as a replica of the node that took its slots (nodes.conf
    # remembers the cluster), and the drift repair gives it the tenant's user again; the tenant's own user
    # then works through the cluster, on the promoted primary.
    def rejoined() -> bool:
        with old_primary.client() as client:
            role = client.execute_command("ROLE")
        return role[0] == "slave" and int(role[2]) == new_primary.port and role[3] == "connected"

    wait_until(rejoined, 20, "the old primary to rejoin as a replica")
    assert old_primary.port not in tenant_user_nodes(cluster.nodes)
    await repair(settings, credentials)
    assert old_primary.port in tenant_user_nodes(cluster.nodes)
    cluster.wait_healthy()
    username = acl.acl_username(key_space(settings), TENANT)
    committed = await commit_as_tenant(cluster.url, username, credentials.redis_password, durability)
    assert [m.content for m in committed.messages] == ["as the tenant", "after the failover"]

    figures.update(durability=durability, acknowledged_turns=load.count(), acknowledged_turns_lost=stored["lost"])
    record(f"cluster-failover-{durability}", **figures)
    print(f"cluster failover, commits {durability}: {figures}")
    assert figures["failover_window_s"] is None or figures["failover_window_s"] < 15
