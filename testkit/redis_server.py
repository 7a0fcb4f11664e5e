"""A real redis-server process on a free port, for tests and benchmarks.

Started with AOF on and ``appendfsync always`` so a ``kill -9`` loses nothing that was acknowledged.
"""

from __future__ import annotations

import collections
import os
import random
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry


def port_is_free(port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) != 0


# Test servers take ports below the kernel's ephemeral range (32768+): a port from ``bind(0)`` is an
# ephemeral one, which any process's outgoing connection may take between our check and the server's bind
# (seen on a busy run: a Redis Cluster node's bus port, "Address already in use"). Below that range only
# servers choose ports, and ours choose at random.
QUIET_PORTS = range(20_000, 32_000)
_recent_ports: collections.deque[int] = collections.deque(maxlen=4000)  # so two servers never share one
_port_choice = random.SystemRandom()  # independent of tests that seed the module's random


def _can_bind(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def quiet_ports(count: int) -> list[int]:
    """``count`` consecutive free ports in QUIET_PORTS (for scripts that take fixed ports, such as
    scripts/run-local.sh)."""
    for _ in range(1000):
        first = _port_choice.randrange(QUIET_PORTS.start, QUIET_PORTS.stop - count)
        ports = list(range(first, first + count))
        if not any(port in _recent_ports for port in ports) and all(_can_bind(port) for port in ports):
            _recent_ports.extend(ports)
            return ports
    raise RuntimeError(f"no {count} consecutive free ports in {QUIET_PORTS}")


def free_port() -> int:
    """A free port in QUIET_PORTS, not handed out lately by this process."""
    return quiet_ports(1)[0]


def redis_binary(name: str) -> str:
    """Debian's ``redis-server``, ``redis-cli`` or ``redis-sentinel`` (scripts/ensure-system-packages.sh)."""
    binary = shutil.which(name)
    if binary is None:
        raise RuntimeError(f"{name} is not installed: run `make install` (it installs the Debian package)")
    return binary


def redis_server_binary() -> str:
    return redis_binary("redis-server")


class RedisServer:
    """One redis-server child process. ``kill()`` is SIGKILL; ``start()`` again reuses the data dir."""

    def __init__(self, data_dir: Path, port: int | None = None, *extra_args: str) -> None:
        self.data_dir = data_dir
        self.port = port or free_port()
        self.extra_args = list(extra_args)
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, timeout: float = 10.0) -> RedisServer:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        args = [
            redis_server_binary(),
            "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.data_dir),
            "--appendonly", "yes", "--appendfsync", "always", "--save", "",
            "--logfile", str(self.data_dir / "redis.log"), *self.extra_args,
        ]  # fmt: skip
        self.process = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + timeout
        client = redis.Redis(port=self.port, socket_connect_timeout=0.2)
        try:
            while True:
                try:
                    if client.ping():
                        return self
                except redis.exceptions.RedisError:
                    pass
                if self.process.poll() is not None or time.monotonic() > deadline:
                    log = (self.data_dir / "redis.log").read_text(errors="replace")[-2000:]
                    raise RuntimeError(f"redis-server did not start on port {self.port}:\n{log}")
                time.sleep(0.02)
        finally:
            client.close()

    def kill(self) -> None:
        """SIGKILL, as a crash would."""
        if self.process and self.process.poll() is None:
            os.kill(self.process.pid, signal.SIGKILL)
            self.process.wait()

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.kill()


def commands_known(root: Path, commands: set[str]) -> set[str]:
    """Those of ``commands`` this redis-server knows (ACL SETUSER refuses unknown ones; Debian's 7.0 lacks
    e.g. ``client|setinfo``), asked of a scratch server started in ``root``."""
    server = RedisServer(root).start()
    try:
        client = redis.Redis(port=server.port)
        known = set()
        for command in commands:
            try:
                client.execute_command("ACL", "SETUSER", "probe", f"+{command}")
                known.add(command)
            except redis.ResponseError:
                pass
        client.close()
    finally:
        server.stop()
    return known


def strict_client(host: str, port: int, username: str | None, password: str | None) -> redis.Redis:
    """A client that never retries and gives up after 2 s: what an ACL test needs to see a refusal as it is."""
    return redis.Redis(
        host=host,
        port=port,
        username=username,
        password=password,
        socket_timeout=2,
        decode_responses=True,
        retry=Retry(NoBackoff(), 0),
    )
