"""Concurrency: many sessions across 3 replicas through HAProxy (round-robin, no affinity), and one
session hit by concurrent turns. Checked in Redis (XRANGE of every session's log): 0 lost, 0
duplicated, 0 interleaved, each session in the order its turns were sent."""

from __future__ import annotations

import asyncio
import time

import httpx
import pytest

from tests.reliability.conftest import MakeStack
from tests.reliability.support import (
    LoadResult,
    audit_sessions,
    message_for,
    p50,
    percentile,
    record,
    run_sessions,
    send_turn,
    turn_id,
)


async def many_sessions_through_the_load_balancer(
    make_stack: MakeStack, scenario: str, sessions: int, turns: int, concurrency: int
) -> None:
    stack = make_stack(replicas=3)
    names = [f"{scenario}-{i:04d}" for i in range(sessions)]
    started = time.monotonic()
    result = await run_sessions(stack.url, names, turns, concurrency, LoadResult())
    elapsed = time.monotonic() - started
    with stack.client() as client:
        audit = audit_sessions(client, names, turns, result.acked)
    assert not result.failed, result.failed[:5]
    assert audit.clean, audit.problems[:10]
    assert audit.stored_turns == sessions * turns == len(result.acked)
    assert len(result.served_by) == 3, "HAProxy must spread the turns over the 3 replicas"
    seconds = [s for _, s in result.latencies]
    record(
        scenario,
        sessions=sessions,
        turns_per_session=turns,
        concurrency=concurrency,
        replicas=3,
        turns_sent=sessions * turns,
        turns_acknowledged=len(result.acked),
        turns_stored=audit.stored_turns,
        lost=audit.lost,
        duplicated=audit.duplicated,
        interleaved=audit.interleaved,
        out_of_order=audit.out_of_order,
        errors=result.errors,
        per_replica=sorted(result.served_by.values()),
        seconds=round(elapsed, 1),
        turns_per_second=round(sessions * turns / elapsed, 1),
        p50_ms=round(p50(seconds) * 1000, 1),
        p99_ms=round(percentile(seconds, 0.99) * 1000, 1),
    )


async def test_50_sessions_of_20_turns_at_concurrency_50_lose_duplicate_and_interleave_nothing(
    make_stack: MakeStack,
) -> None:
    """The fast version, in make test."""
    await many_sessions_through_the_load_balancer(make_stack, "concurrency-fast", 50, 20, 50)


@pytest.mark.slow
async def test_200_sessions_of_20_turns_at_concurrency_50_lose_duplicate_and_interleave_nothing(
    make_stack: MakeStack,
) -> None:
    await many_sessions_through_the_load_balancer(make_stack, "concurrency", 200, 20, 50)


async def test_concurrent_turns_on_one_session_keep_each_pair_adjacent(make_stack: MakeStack) -> None:
    stack = make_stack(replicas=3)
    session, turns, rounds = "one-session-many-writers", 20, 4
    result = LoadResult()
    async with httpx.AsyncClient(timeout=10.0) as client:
        for round_ in range(rounds):  # 20 turns of one session in flight at once, 4 times
            indexes = range(round_ * turns, (round_ + 1) * turns)
            await asyncio.gather(
                *(send_turn(client, stack.url, session, turn_id(session, i), message_for(session, i), result)
                  for i in indexes)
            )  # fmt: skip
        # and every one of them again, concurrently: retries store nothing twice
        await asyncio.gather(
            *(send_turn(client, stack.url, session, turn_id(session, i), message_for(session, i), result)
              for i in range(turns))
        )  # fmt: skip
    with stack.client() as redis_client:
        audit = audit_sessions(redis_client, [session], turns * rounds, result.acked, ordered=False)
    assert not result.failed
    assert audit.clean, audit.problems[:10]
    assert audit.stored_turns == turns * rounds
    assert len(result.served_by) == 3
    record(
        "same_session",
        concurrent_turns=turns,
        rounds=rounds,
        retried_concurrently=turns,
        turns_stored=audit.stored_turns,
        lost=audit.lost,
        duplicated=audit.duplicated,
        interleaved=audit.interleaved,
    )
