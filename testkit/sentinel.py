"""A real Redis Sentinel topology on free ports, for tests and ``make run REDIS_MODE=sentinel``: one primary,
replicas following it, and Sentinels watching it (Debian's ``redis-server`` and ``redis-sentinel``).

Every process runs in its own process group and is stopped with bounded waits. Failover timings are
small (``down-after-milliseconds`` 1000 by default), so a killed primary is replaced within seconds.
Readiness and failovers are polled with deadlines, never slept for.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import redis

from testkit.processes import stop_process
from testkit.redis_server import free_port, redis_binary, redis_server_binary

T = TypeVar("T")
SERVICE = "engram"
# Replication without the waits meant for production: a full sync starts at once (not after 5 s of waiting
# for more replicas), a stopping primary does not wait up to 10 s for its replicas to catch up, and no AOF
# (a replica refuses SIGTERM while it writes its first AOF after a sync: "Writing initial AOF, can't exit").
# Durability across a failover is what the replicas hold, not what a node's disk holds.
FAST_REPLICA = ("--repl-diskless-sync-delay", "0", "--shutdown-timeout", "0", "--appendonly", "no")


def wait_until(check: Callable[[], T], timeout: float, what: str, interval: float = 0.05) -> T:
    """Poll ``check`` until it returns something truthy (errors count as not yet); bounded by ``timeout``."""
    deadline = time.monotonic() + timeout
    last_error: Exception | None = None
    while True:
        try:
            result = check()
            if result:
                return result
        except (redis.RedisError, OSError, KeyError) as error:
            last_error = error
        if time.monotonic() > deadline:
            raise TimeoutError(
                f"waited {timeout} s for {what}" + (f" (last error: {last_error})" if last_error else "")
            )
        time.sleep(interval)


def redis_sentinel_command() -> list[str]:
    return [redis_binary("redis-sentinel")]


class Node:
    """One redis-server (or redis-sentinel) in a process group of its own."""

    def __init__(self, name: str, directory: Path, port: int, args: list[str]) -> None:
        self.name, self.directory, self.port, self.args = name, directory, port, args
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def address(self) -> tuple[str, int]:
        return ("127.0.0.1", self.port)

    def client(self, **kwargs: object) -> redis.Redis:
        return redis.Redis(port=self.port, socket_timeout=2, socket_connect_timeout=1, decode_responses=True, **kwargs)  # type: ignore[arg-type]

    def spawn(self, *extra_args: str) -> Node:
        self.directory.mkdir(parents=True, exist_ok=True)
        self.process = subprocess.Popen(
            [*self.args, *extra_args],
            cwd=self.directory,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        return self

    def wait_ready(self, timeout: float = 10.0) -> Node:
        def answers() -> bool:
            if self.process is not None and self.process.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.process.returncode}: {self.log()}")
            with self.client() as client:
                return bool(client.ping())

        wait_until(answers, timeout, f"{self.name} on port {self.port}")
        return self

    def log(self) -> str:
        return self.log_text()[-2000:]

    def log_text(self) -> str:
        path = self.directory / "log"
        return path.read_text(errors="replace") if path.exists() else ""

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def kill(self) -> None:
        """SIGKILL the process group, as a crash would; reaped."""
        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=10)

    def stop(self) -> None:
        if self.process is not None:
            stop_process(self.process, timeout=5)


class SentinelTopology:
    """``replicas`` replicas of one primary and ``sentinels`` Sentinels monitoring it as ``engram``.

    ``extra_redis_args`` go to every redis-server (e.g. ACL settings); nodes keep their data directory, so
    a killed node started again comes back with its AOF (and the Sentinels make it a replica)."""

    def __init__(
        self,
        directory: Path,
        *,
        replicas: int = 2,
        sentinels: int = 3,
        down_after_ms: int = 1000,
        failover_timeout_ms: int = 3000,
        ports: list[int] | None = None,
        extra_redis_args: tuple[str, ...] = (),
    ) -> None:
        count = 1 + replicas + sentinels
        ports = ports or [free_port() for _ in range(count)]
        self.directory = directory
        self.quorum = sentinels // 2 + 1
        self.down_after_ms, self.failover_timeout_ms = down_after_ms, failover_timeout_ms
        primary_port = ports[0]
        self.nodes = [
            self._redis(f"redis-{i}", ports[i], primary_port if i else None, extra_redis_args)
            for i in range(1 + replicas)
        ]
        self.sentinels = [
            self._sentinel(f"sentinel-{i}", ports[1 + replicas + i], primary_port) for i in range(sentinels)
        ]

    def _redis(self, name: str, port: int, primary: int | None, extra: tuple[str, ...]) -> Node:
        directory = self.directory / name
        args = [
            redis_server_binary(),
            "--port", str(port), "--bind", "127.0.0.1", "--dir", str(directory), "--logfile", str(directory / "log"),
            "--save", "",
            # a replica that lost its primary answers reads it holds, but the service only uses the primary
            "--replica-serve-stale-data", "yes",
            *FAST_REPLICA, *extra,
        ]  # fmt: skip
        if primary is not None:
            args += ["--replicaof", "127.0.0.1", str(primary)]
        return Node(name, directory, port, args)

    def _sentinel(self, name: str, port: int, primary: int) -> Node:
        directory = self.directory / name
        directory.mkdir(parents=True, exist_ok=True)
        config = directory / "sentinel.conf"  # Sentinel rewrites its config file: one each, writable
        config.write_text(
            "\n".join(
                [
                    f"port {port}",
                    "bind 127.0.0.1",
                    f"dir {directory}",
                    f"logfile {directory / 'log'}",
                    f"sentinel monitor {SERVICE} 127.0.0.1 {primary} {self.quorum}",
                    f"sentinel down-after-milliseconds {SERVICE} {self.down_after_ms}",
                    f"sentinel failover-timeout {SERVICE} {self.failover_timeout_ms}",
                    f"sentinel parallel-syncs {SERVICE} 2",
                    "",
                ]
            )
        )
        return Node(name, directory, port, [*redis_sentinel_command(), str(config)])

    # --- life cycle --------------------------------------------------------------------------------
    def start(self, timeout: float = 30.0) -> SentinelTopology:
        try:
            for node in self.nodes:
                node.spawn()
            for node in self.nodes:
                node.wait_ready()
            # Replicas connected before the Sentinels start: a Sentinel learns them from the primary's INFO,
            # which it asks at once and then only every 10 s.
            with self.nodes[0].client() as primary:
                replicas = len(self.nodes) - 1
                wait_until(
                    lambda: int(primary.info("replication")["connected_slaves"]) >= replicas, timeout, "replicas"
                )
            for sentinel in self.sentinels:
                sentinel.spawn()
            for sentinel in self.sentinels:
                sentinel.wait_ready()
            self.wait_settled(len(self.nodes) - 1, timeout, primary_port=self.nodes[0].port)
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        for node in [*self.sentinels, *self.nodes]:
            node.stop()

    # --- what the Sentinels see ----------------------------------------------------------------------
    @property
    def sentinel_addresses(self) -> str:
        """``ENGRAM_REDIS_SENTINELS``."""
        return ",".join(f"127.0.0.1:{s.port}" for s in self.sentinels)

    @property
    def url(self) -> str:
        """The library's ``redis+sentinel://`` URL."""
        return f"redis+sentinel://{self.sentinel_addresses}/{SERVICE}/0"

    def primary_port(self) -> int | None:
        """The primary's port as a majority of the running Sentinels report it (None while they disagree)."""
        seen: dict[int, int] = {}
        for sentinel in self.sentinels:
            if not sentinel.running:
                continue
            try:
                with sentinel.client() as client:
                    host_port = client.sentinel_get_master_addr_by_name(SERVICE)
            except redis.RedisError:
                continue
            if host_port:
                seen[int(host_port[1])] = seen.get(int(host_port[1]), 0) + 1
        agreed = [port for port, votes in seen.items() if votes >= self.quorum]
        return agreed[0] if agreed else None

    def restart_as_replica(self, node: Node) -> Node:
        """Start a stopped node again the way a start script should: as a replica of the primary the
        Sentinels name now (its own arguments may still say it follows the old primary: the last
        --replicaof wins). Left to itself, a returning old primary is converted by the Sentinels too, but
        only after their 10 s INFO period plus 8 s of reporting the master role: up to about 30 s."""
        port = self.primary_port()
        if port is None:
            raise RuntimeError("the Sentinels do not agree on a primary")
        return node.spawn("--replicaof", "127.0.0.1", str(port)).wait_ready()

    def node_on(self, port: int) -> Node:
        return next(node for node in self.nodes if node.port == port)

    def primary(self) -> Node:
        port = self.primary_port()
        if port is None:
            raise RuntimeError("the Sentinels do not agree on a primary")
        return self.node_on(port)

    def wait_settled(
        self, replicas: int, timeout: float, *, primary_port: int | None = None, away_from: int | None = None
    ) -> int:
        """Until every Sentinel names one primary (``primary_port``, or any but ``away_from``), knows the other
        Sentinels and sees ``replicas`` replicas up, and that primary has them connected; returns its port.

        Without ``primary_port`` the primary is read again at every poll, so a second failover the Sentinels
        start on their own (seen on a loaded machine: a Sentinel whose link to the just-promoted primary is not
        up within ``down_after_ms`` votes it down too) is followed, not mistaken for a failure."""

        def settled() -> int | None:
            views = []  # (primary port, healthy, replicas up) as each Sentinel sees them
            for sentinel in self.sentinels:
                with sentinel.client() as client:
                    state = client.sentinel_master(SERVICE)
                    up = [r for r in client.sentinel_slaves(SERVICE) if not r["is_sdown"] and not r["is_odown"]]
                healthy = not state.get("is_sdown") and not state.get("is_odown")
                healthy = healthy and int(state["num-other-sentinels"]) == len(self.sentinels) - 1
                views.append((int(state["port"]), healthy, len(up)))
            # without Sentinels (a plain primary with replicas) the primary is the one given
            ports = {port for port, _, _ in views} if views else {primary_port}
            port = ports.pop() if len(ports) == 1 else None
            if port is None or port == away_from or (primary_port is not None and port != primary_port):
                return None
            if not all(healthy and up >= replicas for _, healthy, up in views):
                return None
            with self.node_on(port).client() as client:
                info = client.info("replication")
            return port if info["role"] == "master" and int(info["connected_slaves"]) >= replicas else None

        wanted = primary_port if primary_port is not None else f"a primary other than {away_from}"
        return wait_until(settled, timeout, f"the Sentinels to settle on {wanted} with {replicas} replicas")

    def wait_failover(self, old_port: int, timeout: float = 30.0) -> int:
        """Until the Sentinels have settled on a primary other than ``old_port`` with the other replica(s) up
        (all but the old primary), and that primary serves; returns its port."""
        return self.wait_settled(len(self.nodes) - 2, timeout, away_from=old_port)

    def failovers(self) -> int:
        """How many times the primary changed, as the first Sentinel logged it (``+switch-master``)."""
        return self.sentinels[0].log_text().count("+switch-master")
