"""Chaos (``make chaos``): one long run with faults in a row while 100 sessions x 30 turns go through
HAProxy at concurrency 30: replica 1 killed and restarted, replica 2 killed and restarted, redis-server
killed and restarted (``appendfsync always``), replica 3 killed and restarted. Clients retry with the
same ``turn_id``. Then, in Redis: every turn stored exactly once, pairs adjacent, sessions in order."""

from __future__ import annotations

import asyncio
import time

import pytest

from tests.reliability.conftest import MakeStack
from tests.reliability.fake_model import FakeModel
from tests.reliability.support import LoadResult, audit_sessions, record, run_sessions

SESSIONS, TURNS, CONCURRENCY = 100, 30, 30


@pytest.mark.slow
def test_replicas_and_redis_killed_in_a_row_under_load_lose_and_duplicate_nothing(make_stack: MakeStack) -> None:
    with FakeModel("reply", delay=0.02) as model:
        stack = make_stack(replicas=3, redis_args=("--appendfsync", "always"), **model.service_env(10))
        names = [f"chaos-{i:03d}" for i in range(SESSIONS)]
        progress = {"done": 0}
        faults: list[str] = []
        total = SESSIONS * TURNS

        def on_turn(done: int) -> None:
            progress["done"] = done

        async def until(fraction: float, fresh: int = 150) -> None:
            """Until ``fraction`` of all turns, and at least ``fresh`` more since the last fault, are
            acknowledged (never past 90 %: the last fault must land while the load still runs)."""
            target = min(max(total * fraction, progress["done"] + fresh), total * 0.9)
            deadline = time.monotonic() + 120
            while progress["done"] < target:
                assert time.monotonic() < deadline, f"stuck at {progress['done']} turns"
                await asyncio.sleep(0.05)

        async def restart_replica(index: int) -> None:
            replica = stack.replicas[index]
            await asyncio.to_thread(replica.kill)
            faults.append(f"replica {index + 1} killed at turn {progress['done']}")
            await asyncio.sleep(1.0)  # down for a second, then the same port again
            await asyncio.to_thread(lambda: replica.spawn().wait("/readyz"))

        async def chaos() -> None:
            await until(0.1)
            await restart_replica(0)
            await until(0.3)
            await restart_replica(1)
            await until(0.5)
            await asyncio.to_thread(stack.redis.kill)
            faults.append(f"redis killed at turn {progress['done']}")
            await asyncio.sleep(2.0)
            await asyncio.to_thread(stack.redis.start)
            await until(0.7)
            await restart_replica(2)

        result = LoadResult()
        started = time.monotonic()

        async def scenario() -> None:
            await asyncio.gather(
                run_sessions(stack.url, names, TURNS, CONCURRENCY, result, give_up_after=60, on_turn=on_turn), chaos()
            )

        asyncio.run(scenario())
        elapsed = time.monotonic() - started
        with stack.client() as client:
            audit = audit_sessions(client, names, TURNS, result.acked)
    record(
        "chaos",
        sessions=SESSIONS,
        turns_per_session=TURNS,
        concurrency=CONCURRENCY,
        replicas=3,
        faults=faults,
        seconds=round(elapsed, 1),
        turns_retried=result.retries,
        retry_errors=result.errors,
        turns_acknowledged=len(result.acked),
        turns_stored=audit.stored_turns,
        lost=audit.lost,
        duplicated=audit.duplicated,
        interleaved=audit.interleaved,
        out_of_order=audit.out_of_order,
    )
    assert len(faults) == 4
    assert not result.failed, result.failed[:5]
    assert audit.clean, audit.problems[:10]
    assert audit.stored_turns == total == len(result.acked)
