"""Fixtures shared by every test: real redis-server processes on free ports (no fakes); and the check
that no process a test started outlives the test run."""

from __future__ import annotations

import os
import signal
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from testkit.cluster import ClusterTopology
from testkit.processes import LEAK_MARKER, ProcessInfo, tagged_processes
from testkit.redis_server import RedisServer

# Seconds a process may take to vanish after the last test's teardown (a SIGTERMed child may still be exiting).
LEFTOVER_GRACE = 10.0


def _describe_lambdas_without_crashing() -> None:
    """CPython 3.11.7's ``ast.parse`` can raise ``SystemError: AST constructor recursion depth mismatch``
    when it is called deep in the stack. Hypothesis parses a lambda's source only to describe a strategy
    in a repr (schemathesis's recursive JSON strategies build such reprs eagerly), so that crash failed a
    test that had found nothing: such a lambda is described without its source instead."""
    from hypothesis.internal import lambda_sources

    describe = lambda_sources.lambda_description

    def lambda_description(f: object) -> str:
        try:
            return describe(f)  # type: ignore[no-any-return]
        except SystemError:
            return "lambda: <source not shown>"

    lambda_sources.lambda_description = lambda_description  # type: ignore[assignment]


def pytest_configure(config: pytest.Config) -> None:
    _describe_lambdas_without_crashing()
    # Inherited by every process the tests start (unless a test builds an environment from nothing),
    # so the end-of-run check finds leftovers even after they were re-parented to PID 1.
    os.environ[LEAK_MARKER] = f"{os.getpid()}-{uuid.uuid4().hex[:12]}"


def kill_leftovers() -> list[ProcessInfo]:
    """Processes this test run started that are still alive after a bounded wait for them to exit;
    SIGKILLed, so the machine is left clean either way."""
    deadline = time.monotonic() + LEFTOVER_GRACE
    while True:
        left = tagged_processes(os.environ[LEAK_MARKER], exclude={os.getpid()})
        if not left or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    for info in left:
        try:
            os.kill(info.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    return left


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """Fail the run if any process it started (redis-server, uvicorn, haproxy, chromium, ...) outlived it."""
    left = kill_leftovers()
    if not left:
        return
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    lines = [f"{len(left)} process(es) started by the tests outlived them (now killed):"]
    lines += [f"  {info}" for info in left]
    for line in lines:
        if reporter is not None:
            reporter.write_line(line, red=True)
        else:
            print(line)
    session.exitstatus = pytest.ExitCode.TESTS_FAILED


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    """A fresh redis-server (AOF on, fsync always) for one test."""
    server = RedisServer(tmp_path / "redis").start()
    yield server
    server.stop()


@pytest.fixture
def redis_url(redis_server: RedisServer) -> str:
    return redis_server.url


@pytest.fixture(scope="session")
def shared_redis_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ClusterTopology]:
    """One real Redis Cluster (3 primaries, 3 replicas) for the tests that run on every topology; started
    on first use. Tests get it empty through :func:`redis_cluster`. Tests that break a cluster (kill,
    reshard) start their own ClusterTopology."""
    cluster = ClusterTopology(tmp_path_factory.mktemp("cluster")).start()
    yield cluster
    cluster.stop()


@pytest.fixture
def redis_cluster(shared_redis_cluster: ClusterTopology) -> ClusterTopology:
    """The shared cluster with no keys (FLUSHALL on every primary; the function library stays)."""
    shared_redis_cluster.wait_healthy()
    for node in shared_redis_cluster.primaries():
        with node.client() as client:
            client.flushall()
    return shared_redis_cluster
