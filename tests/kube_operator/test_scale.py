"""How long the operator takes to reconcile 100 MemoryNamespaces (KMock + a real redis-server).

Runs the exact command the Helm chart uses, as a separate process: `kopf run --standalone --all-namespaces
-m engram_operator.handlers --liveness=...`. Slow-marked (not in `make test`); see the figures with
`pytest -m slow tests/kube_operator/test_scale.py -s`.

KMock is an in-process Python emulator sharing the 2 cores with the operator, so wall time is an upper
bound; the operator's own CPU time is printed next to it. KMock matches every request against its whole
request log (quadratic over a long run), so this test keeps that log short (``trim_request_log``).
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import httpx
import pytest
import redis.asyncio as aioredis

from engram.history import HistoryStore
from engram.redis_keys import KeySpace
from testkit.processes import stop_process
from testkit.redis_server import free_port
from tests.kube_operator.conftest import Cluster, eventually, memory_namespace

COUNT = 100
pytestmark = pytest.mark.slow


class OperatorProcess:
    def __init__(self, redis_url: str, log: Path) -> None:
        self.port = free_port()
        env = {**os.environ, "ENGRAM_REDIS_URL": redis_url, "ENGRAM_OPERATOR_REPAIR_INTERVAL_SECONDS": "600"}
        kopf = str(Path(sys.executable).with_name("kopf"))
        command = [kopf, "run", "--standalone", "--all-namespaces", "-m", "engram_operator.handlers",
                   f"--liveness=http://127.0.0.1:{self.port}/healthz"]  # fmt: skip
        self.started = time.monotonic()
        with log.open("ab") as output:
            self.process = subprocess.Popen(command, env=env, stdout=output, stderr=subprocess.STDOUT)

    async def wait_alive(self) -> float:
        """Seconds from start until the liveness endpoint answers (awaiting, so KMock keeps serving)."""

        async def alive() -> bool:
            try:
                async with httpx.AsyncClient() as client:
                    return (await client.get(f"http://127.0.0.1:{self.port}/healthz", timeout=1)).status_code == 200
            except httpx.HTTPError:
                return False

        await eventually(alive, timeout=60, interval=0.1)
        return time.monotonic() - self.started

    def cpu_seconds(self) -> float:
        fields = Path(f"/proc/{self.process.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime

    def stop(self) -> None:
        stop_process(self.process)


@pytest.fixture
async def trim_request_log(cluster: Cluster) -> AsyncIterator[None]:
    """Keep KMock's request log short: it is only needed for assertions, and this test makes none on it."""

    async def trim() -> None:
        while True:
            del cluster.k._requests[:-50]  # keep the recent ones: requests in flight are matched against them
            await asyncio.sleep(0.1)

    task = asyncio.create_task(trim())
    yield
    task.cancel()


@pytest.fixture
def start_operator(cluster: Cluster, redis_url: str, tmp_path: Path) -> Iterator[Callable[[], OperatorProcess]]:
    started: list[OperatorProcess] = []

    def start() -> OperatorProcess:
        started.append(OperatorProcess(redis_url, tmp_path / "operator.log"))
        return started[-1]

    yield start
    for process in started:
        process.stop()


async def test_reconcile_time_for_100_resources(
    trim_request_log: None,
    cluster: Cluster,
    start_operator: Callable[[], OperatorProcess],
    redis_client: aioredis.Redis,
) -> None:
    names = [f"tenant-{i:03d}" for i in range(COUNT)]

    # 1. The operator is up and idle; 100 resources arrive at once: everything is set up from scratch.
    operator = start_operator()
    startup = await operator.wait_alive()
    cpu_idle = operator.cpu_seconds()
    started = time.monotonic()
    for name in names:
        await cluster.create(memory_namespace(name))
    created = time.monotonic() - started
    await eventually(lambda: all(cluster.status(n).get("phase") == "Ready" for n in names), timeout=120)
    setup = time.monotonic() - started
    setup_cpu = operator.cpu_seconds() - cpu_idle
    assert await redis_client.scard(KeySpace().tenant_set()) == COUNT
    operator.stop()

    # 2. Restart with the 100 in place: each is re-checked (resume); nothing changes but the session counts.
    store = HistoryStore(redis_client, KeySpace(), cache_sessions=0, tokenizer=lambda text: 1)
    await asyncio.gather(*(store.commit_turn(name, "s1", "t1", "hi", "hello") for name in names))
    secrets_before = {n: cluster.secret(f"{n}-engram") for n in names}
    operator = start_operator()
    await eventually(lambda: all(cluster.status(n).get("sessions") == 1 for n in names), timeout=120)
    resume = time.monotonic() - operator.started
    resume_cpu = operator.cpu_seconds()
    assert {n: cluster.secret(f"{n}-engram") for n in names} == secrets_before

    print(
        f"\n{COUNT} MemoryNamespaces, 2 cores shared by the operator process, KMock and redis-server:\n"
        f"  operator start-up to liveness: {startup:.1f} s (CPU {cpu_idle:.1f} s, mostly imports)\n"
        f"  create {COUNT} (POSTs took {created:.1f} s) -> all Ready (Secret, ACL user, record, status): "
        f"{setup:.1f} s, {setup / COUNT * 1000:.0f} ms per resource; operator CPU {setup_cpu:.1f} s\n"
        f"  restart -> all {COUNT} re-checked, nothing changed but session counts: {resume:.1f} s from process "
        f"start (operator CPU {resume_cpu:.1f} s, start-up included)"
    )
    assert setup < 60 and resume < 60
