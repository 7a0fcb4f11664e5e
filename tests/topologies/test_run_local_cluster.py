"""``make run REDIS_MODE=cluster``: the local stack on a Redis Cluster of 3 primaries and 3 replicas. Turns go
through HAProxy to the replicas, each commit lands on the primary of the session's hash slot (which /metrics
names), a replica has every acknowledged turn (replicated commits are the default), and a killed primary's
replica takes its slots over: while it has no replica of its own, turns are refused (JSON 503, Retry-After),
never half stored; once the killed node is back (as the new primary's replica) the conversation goes on, and
the next ``make run`` re-forms the same cluster and remembers it."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import redis

from engram.redis_keys import KeySpace
from testkit.local_stack import LocalStack, stack_env
from testkit.redis_server import port_is_free, quiet_ports, redis_server_binary
from testkit.sentinel import wait_until

NODES, REPLICAS = 6, 2
COMMITS = re.compile(r'^engram_redis_commits_total\{node="([^"]+)"\} ([0-9.]+)$', re.MULTILINE)


def commits_by_node(replica_ports: list[int]) -> dict[str, float]:
    """``engram_redis_commits_total`` of every service replica, summed by node."""
    total: dict[str, float] = {}
    for port in replica_ports:
        text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
        for node, value in COMMITS.findall(text):
            total[node] = total.get(node, 0.0) + float(value)
    return total


def slot_nodes(port: int, slot: int) -> list[int]:
    """The ports of the primary serving ``slot`` (as node ``port``'s slot map says now) and of the replicas
    connected to it (its INFO: CLUSTER SLOTS leaves out a replica until gossip says it has replicated data)."""
    with redis.Redis(port=port, decode_responses=True) as client:
        for start, end, primary, *_ in client.execute_command("CLUSTER", "SLOTS"):
            if int(start) <= slot <= int(end):
                with redis.Redis(port=int(primary[1]), decode_responses=True) as node:
                    info = node.info("replication")
                replicas = [info[f"slave{i}"] for i in range(int(info["connected_slaves"]))]
                return [int(primary[1]), *(int(r["port"]) for r in replicas if r["state"] == "online")]
    raise AssertionError(f"no node serves slot {slot}")


def turn(client: httpx.Client, n: int, within: float = 30.0) -> httpx.Response:
    """Turn ``n`` of session ``s``, retried while it gets 503 (a test may retry sooner than Retry-After), for
    ``within`` s at most."""
    body = {"session_id": "s", "message": f"message {n}", "turn_id": f"t{n}"}
    deadline = time.monotonic() + within
    while (answer := client.post("/v1/chat", json=body)).status_code == 503 and time.monotonic() < deadline:
        time.sleep(0.2)
    return answer


def restarted(port: int, bus_port: int, directory: Path) -> subprocess.Popen[bytes]:
    """A killed node of run-local.sh's cluster started again as the script starts it (its AOF and nodes.conf
    are in ``directory``), as a user would restart it."""
    args = ["--port", str(port), "--bind", "127.0.0.1", "--dir", str(directory), "--appendonly", "yes"]
    args += ["--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf", "--cluster-port", str(bus_port)]
    args += ["--cluster-node-timeout", "2000", "--aclfile", str(directory / "users.acl")]
    with (directory / "restarted.log").open("ab") as out:
        return subprocess.Popen(
            [redis_server_binary(), *args], stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )


def test_make_run_on_a_cluster_commits_on_the_slots_primary_and_survives_a_killed_primary(tmp_path: Path) -> None:
    ports = quiet_ports(1 + NODES + REPLICAS + NODES)
    lb, redis_port, base, bus_base = ports[0], ports[1], ports[1 + NODES], ports[1 + NODES + REPLICAS]
    env = stack_env(
        tmp_path / "run",
        [lb, redis_port, base],
        replicas=REPLICAS,
        REDIS_MODE="cluster",
        CLUSTER_BUS_BASE_PORT=str(bus_base),
        ENGRAM_AUTH="disabled",
        PYTHON=sys.executable,
    )
    replica_ports = [base + i for i in range(REPLICAS)]
    stack = LocalStack(env, log=tmp_path / "run-local.out")
    with stack, httpx.Client(base_url=f"http://127.0.0.1:{lb}", timeout=10) as client:
        assert f"3 primaries + 3 replicas on ports {redis_port}-{redis_port + 5}" in stack.output, stack.output

        def say(n: int, within: float = 30.0) -> httpx.Response:
            return turn(client, n, within)

        log_key = KeySpace(tenant_slot=True).session("default", "s").log
        with redis.Redis(port=redis_port, decode_responses=True) as seed:
            slot = int(seed.execute_command("CLUSTER", "KEYSLOT", log_key))
        primary, replica = slot_nodes(redis_port, slot)  # (run-local.sh waited until every node knew them)

        for n in range(4):  # round-robin: both service replicas commit
            answer = say(n)
            assert answer.status_code == 200, answer.text
            assert answer.json()["redis_node"] == f"127.0.0.1:{primary}"  # what the page shows per turn
        assert f'"message {n - 1}"' in answer.json()["reply"], answer.text
        # the commit node is the primary serving the session's slot, on every replica's /metrics
        assert commits_by_node(replica_ports) == {f"127.0.0.1:{primary}": 4.0}
        # replicated commits (cluster mode's default): the slot's replica had each turn before its answer
        with redis.Redis(port=replica, decode_responses=True) as copy:
            copy.execute_command("READONLY")
            assert copy.xlen(log_key) == 8  # 4 turns: a user message and a reply each

        with redis.Redis(port=primary, decode_responses=True) as node:
            pid = int(node.info("server")["process_id"])
        os.kill(pid, signal.SIGKILL)
        killed = time.monotonic()
        wait_until(lambda: slot_nodes(replica, slot) == [replica], 30, "the replica to take the slot over")

        # Promoted, but with no replica left: a turn cannot be acknowledged as replicated, and says so
        # (once the service's cluster client has followed the failover: until then, other 503s).
        def refused_for_no_replica() -> httpx.Response | None:
            answer = say(4, within=0)
            assert answer.status_code == 503 and answer.headers["Retry-After"], answer.text
            return answer if "no Redis replica confirmed it" in answer.json()["error"]["message"] else None

        wait_until(refused_for_no_replica, 30, "a turn refused for want of a replica")
        index = primary - redis_port
        rejoined = restarted(primary, bus_base + index, tmp_path / "run" / "cluster" / f"node-{index}")
        try:
            answer = say(4)
            assert answer.status_code == 200 and '"message 3"' in answer.json()["reply"], answer.text
            print(f"make run REDIS_MODE=cluster: turn answered {time.monotonic() - killed:.1f} s after kill -9")
            assert slot_nodes(replica, slot) == [replica, primary]  # the old primary is the new one's replica
            assert say(5).status_code == 200
            with redis.Redis(port=primary, decode_responses=True) as copy:  # now a replica: every turn, once
                copy.execute_command("READONLY")
                assert copy.xlen(log_key) == 12
            # the commit node follows the slot (a retried turn found stored is no new commit)
            assert commits_by_node(replica_ports) == {f"127.0.0.1:{primary}": 4.0, f"127.0.0.1:{replica}": 1.0}
            returncode = stack.stop(signal.SIGTERM)
        finally:
            rejoined.kill()
            rejoined.wait(10)
    assert returncode == 143, stack.output
    assert stack.leftovers == [], stack.leftovers
    every_port = [lb, *range(redis_port, redis_port + NODES), *replica_ports, *range(bus_base, bus_base + NODES)]
    for port in every_port:
        assert port_is_free(port), f"port {port} still open after SIGTERM"

    # The next run re-forms the same cluster from each node's nodes.conf and AOF: the conversation goes on.
    again = LocalStack(env, log=tmp_path / "run-local-2.out")
    with again, httpx.Client(base_url=f"http://127.0.0.1:{lb}", timeout=10) as client:
        answer = turn(client, 6)
        assert answer.status_code == 200 and '"message 5"' in answer.json()["reply"], answer.text
        assert again.stop(signal.SIGTERM) == 143, again.output
    assert (tmp_path / "run" / "logs" / "cluster-create.log").read_text().count("[OK] All 16384 slots covered") == 1
    assert again.leftovers == [], again.leftovers
    for port in every_port:
        assert port_is_free(port), f"port {port} still open after SIGTERM"
