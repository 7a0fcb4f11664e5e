"""A real Redis Cluster on free ports, for tests, benchmarks and ``make run REDIS_MODE=cluster``: primaries
with a replica each, formed by ``redis-cli --cluster create`` (Debian's ``redis-server`` and ``redis-cli``).

Every node runs in its own process group and is stopped with bounded waits. ``cluster-node-timeout`` is
small (1000 ms by default), so a killed primary's replica is promoted within a few seconds. Readiness,
failovers and reshards are polled with deadlines, never slept for.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import redis

from testkit.redis_server import free_port, redis_binary, redis_server_binary
from testkit.sentinel import FAST_REPLICA, Node, wait_until


class ClusterTopology:
    """``primaries`` primaries with ``replicas_per_primary`` replicas each, all slots assigned.

    ``extra_redis_args`` go to every redis-server (e.g. ACL settings); ``cli_auth`` are the ``redis-cli``
    options (``--user``/``--pass``) the ``--cluster`` commands need then. Nodes keep their data directory
    (and ``nodes.conf``): a killed node started again rejoins the cluster as it left it."""

    def __init__(
        self,
        directory: Path,
        *,
        primaries: int = 3,
        replicas_per_primary: int = 1,
        node_timeout_ms: int = 1000,
        ports: list[int] | None = None,
        extra_redis_args: tuple[str, ...] = (),
        cli_auth: tuple[str, ...] = (),
    ) -> None:
        count = primaries * (1 + replicas_per_primary)
        ports = ports or [free_port() for _ in range(count)]
        self.directory = directory
        self.primaries_wanted, self.replicas_per_primary = primaries, replicas_per_primary
        self.node_timeout_ms = node_timeout_ms
        self.cli_auth = cli_auth
        self.extra_redis_args = extra_redis_args
        self.without_replicas: set[int] = set()  # ports of primaries added without replicas
        self.nodes = [self._redis(f"redis-{i}", port, extra_redis_args) for i, port in enumerate(ports)]

    def _redis(self, name: str, port: int, extra: tuple[str, ...]) -> Node:
        directory = self.directory / name
        args = [
            redis_server_binary(),
            "--port", str(port), "--bind", "127.0.0.1", "--dir", str(directory), "--logfile", str(directory / "log"),
            "--save", "", "--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf",
            "--cluster-node-timeout", str(self.node_timeout_ms),
            # the bus port on a free port of its own (port + 10000 may be taken, or above 65535)
            "--cluster-port", str(free_port()),
            # a replica takes over however long it was cut off (the default refuses after ~10 node timeouts)
            "--cluster-replica-validity-factor", "0",
            *FAST_REPLICA, *extra,
        ]  # fmt: skip
        return Node(name, directory, port, args)

    # --- life cycle --------------------------------------------------------------------------------
    def start(self, timeout: float = 60.0) -> ClusterTopology:
        try:
            for node in self.nodes:
                node.spawn()
            for node in self.nodes:
                node.wait_ready()
            self.cli(
                "--cluster", "create", *(f"127.0.0.1:{node.port}" for node in self.nodes),
                "--cluster-replicas", str(self.replicas_per_primary), "--cluster-yes",
                timeout=timeout,
            )  # fmt: skip
            self.wait_healthy(timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()

    def cli(self, *args: str, timeout: float = 60.0) -> str:
        """Run ``redis-cli <auth> <args>``; its output, or RuntimeError with it when it fails."""
        done = subprocess.run(
            [redis_binary("redis-cli"), *self.cli_auth, *args],
            capture_output=True,
            text=True,
            timeout=timeout,
            start_new_session=True,
        )
        if done.returncode != 0:
            raise RuntimeError(f"redis-cli {' '.join(args[:2])} failed ({done.returncode}): {done.stdout}{done.stderr}")
        return done.stdout

    def add_primary(self, timeout: float = 30.0) -> Node:
        """Start one more node (same settings) and add it as an empty primary (``redis-cli --cluster add-node``)."""
        template = self.nodes[0]
        node = self._redis(f"redis-{len(self.nodes)}", free_port(), self.extra_redis_args)
        self.nodes.append(node)
        node.spawn().wait_ready()
        self.cli("--cluster", "add-node", f"127.0.0.1:{node.port}", f"127.0.0.1:{template.port}", timeout=timeout)
        node_id = self.node_id(node)

        def known_everywhere() -> bool:  # (gossip spreads the new node; redis-cli asks any node about it)
            with self._client(node) as client:  # and the new node has learnt the slot map
                if "cluster_state:ok" not in client.execute_command("CLUSTER", "INFO"):
                    return False
            for other in self.nodes:
                with self._client(other) as client:
                    if not any(
                        line.startswith(node_id) and "master" in line.split()[2]
                        for line in client.execute_command("CLUSTER", "NODES").splitlines()
                    ):
                        return False
            return True

        wait_until(known_everywhere, timeout, f"every node to know the added node {node.port}")
        self.primaries_wanted += 1  # (it serves no slot until some are moved to it)
        self.without_replicas.add(node.port)
        return node

    # --- what the cluster says --------------------------------------------------------------------
    @property
    def seed(self) -> str:
        """``ENGRAM_REDIS_URL`` for cluster mode: one seed node is enough."""
        return f"redis://127.0.0.1:{self.nodes[0].port}"

    @property
    def url(self) -> str:
        """The library's ``redis+cluster://`` URL."""
        return "redis+cluster://" + ",".join(f"127.0.0.1:{node.port}" for node in self.nodes)

    def node_on(self, port: int) -> Node:
        return next(node for node in self.nodes if node.port == port)

    def _client(self, node: Node) -> redis.Redis:
        user, password = _auth(self.cli_auth)
        return node.client(username=user, password=password)

    def roles(self) -> dict[int, str]:
        """``port -> "master" | "slave"`` as each running node sees itself."""
        roles: dict[int, str] = {}
        for node in self.nodes:
            if node.running:
                with self._client(node) as client:
                    roles[node.port] = str(client.execute_command("ROLE")[0])
        return roles

    def node_id(self, node: Node) -> str:
        """The node's cluster id (what ``redis-cli --cluster reshard --cluster-from/--cluster-to`` take)."""
        with self._client(node) as client:
            return str(client.execute_command("CLUSTER", "MYID"))

    def primaries(self) -> list[Node]:
        return [self.node_on(port) for port, role in self.roles().items() if role == "master"]

    def primary_of_slot(self, slot: int) -> Node:
        """The node a running node's slot map names for ``slot``."""
        for node in self.nodes:
            if not node.running:
                continue
            with self._client(node) as client:
                for start, end, primary, *_ in client.execute_command("CLUSTER", "SLOTS"):
                    if int(start) <= slot <= int(end):
                        return self.node_on(int(primary[1]))
        raise RuntimeError(f"no node serves slot {slot}")

    def slots_of(self, node: Node) -> list[int]:
        """The slots ``node`` serves, as the slot map of a running node has it now."""
        slots: list[int] = []
        asked = next(n for n in self.nodes if n.running)
        with self._client(asked) as client:
            for start, end, primary, *_ in client.execute_command("CLUSTER", "SLOTS"):
                if int(primary[1]) == node.port:
                    slots.extend(range(int(start), int(end) + 1))
        return slots

    def wait_healthy(self, timeout: float = 60.0) -> None:
        """Until every running node reports ``cluster_state:ok``, knows every node and sees every running
        replica as a replica (gossip has spread), and each primary that serves slots has its replicas
        connected."""
        running = [node for node in self.nodes if node.running]
        replicas = len(running) - self.primaries_wanted

        def healthy() -> bool:
            serving = 0
            for node in running:
                with self._client(node) as client:
                    info = client.execute_command("CLUSTER", "INFO")
                    state = dict(line.split(":", 1) for line in info.splitlines() if ":" in line)
                    if state.get("cluster_state") != "ok" or int(state["cluster_known_nodes"]) < len(self.nodes):
                        return False
                    flags = [line.split()[2] for line in client.execute_command("CLUSTER", "NODES").splitlines()]
                    if sum("slave" in f and "fail" not in f for f in flags) < replicas:
                        return False
                if self.slots_of(node):
                    serving += 1
                    wanted = 0 if node.port in self.without_replicas else self.replicas_per_primary
                    with self._client(node) as client:
                        if int(client.info("replication")["connected_slaves"]) < wanted:
                            return False
            return serving == self.primaries_wanted

        wait_until(healthy, timeout, "the cluster to be healthy")

    def wait_promoted(self, slot: int, old: Node, timeout: float = 30.0) -> Node:
        """Until a running node other than ``old`` serves ``slot`` as a primary and the cluster is ok."""

        def promoted() -> Node | None:
            node = self.primary_of_slot(slot)
            if node is old or not node.running:
                return None
            with self._client(node) as client:
                info = client.execute_command("CLUSTER", "INFO")
                is_primary = client.execute_command("ROLE")[0] == "master"
            return node if is_primary and "cluster_state:ok" in info else None

        return wait_until(promoted, timeout, f"a replica of port {old.port} to take over slot {slot}")


def _auth(cli_auth: tuple[str, ...]) -> tuple[str | None, str | None]:
    options = dict(zip(cli_auth[::2], cli_auth[1::2], strict=False))
    return options.get("--user"), options.get("--pass")
