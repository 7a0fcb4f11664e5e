"""Soak: steady load on 3 replicas through HAProxy, 30 s in make test and 10 minutes in ``make soak``
(``SOAK_SECONDS`` overrides the long one). 0 errors, every turn in Redis, each replica's RSS (VmRSS)
grows by at most 10 % after a warm-up, and latency is stable (p50 of the last third of the run within
1.5x + 5 ms of the first third's).

The load is a fixed pool of sessions that keep talking (a steady working set, as in production), paced
below the capacity of this 2-core machine so that latency measures the service rather than a queue.
"""

from __future__ import annotations

import asyncio
import os
import time
from dataclasses import dataclass, field

import httpx
import pytest

from tests.reliability.conftest import MakeStack
from tests.reliability.support import (
    LoadResult,
    Stack,
    audit_sessions,
    message_for,
    p50,
    percentile,
    record,
    rss_kib,
    send_turn,
    turn_id,
)

WORKERS, PAUSE, POOL = 8, 0.05, 96
RSS_GROWTH_LIMIT = 0.10


@dataclass
class Soak:
    result: LoadResult
    turns: dict[str, int]
    baseline_kib: dict[int, int] = field(default_factory=dict)
    final_kib: dict[int, int] = field(default_factory=dict)
    rss_timeline: list[dict[int, int]] = field(default_factory=list)
    warmup_ends: float = 0.0


def replica_pids(result: LoadResult) -> list[int]:
    return sorted(int(served.rsplit(":", 1)[1]) for served in result.served_by)


async def soak(stack: Stack, seconds: float) -> Soak:
    sessions = [f"soak-{i:03d}" for i in range(POOL)]
    state = Soak(LoadResult(), dict.fromkeys(sessions, 0))
    warmup = max(5.0, seconds * 0.1)
    started = time.monotonic()
    state.warmup_ends = started + warmup
    ends = started + seconds
    limits = httpx.Limits(max_connections=WORKERS * 2, max_keepalive_connections=WORKERS)

    async with httpx.AsyncClient(timeout=10.0, limits=limits) as client:

        async def worker(mine: list[str]) -> None:
            index = 0
            while time.monotonic() < ends:
                session = mine[index % len(mine)]
                index += 1
                turn = state.turns[session]
                body = await send_turn(
                    client, stack.url, session, turn_id(session, turn), message_for(session, turn), state.result,
                    give_up_after=0,  # no retries: a soak counts every error
                )  # fmt: skip
                if body is not None:
                    state.turns[session] = turn + 1
                await asyncio.sleep(PAUSE)

        async def sample_rss() -> None:
            await asyncio.sleep(warmup)
            state.baseline_kib = {pid: rss_kib(pid) for pid in replica_pids(state.result)}
            interval = max(1.0, (ends - time.monotonic()) / 10)
            while time.monotonic() + interval < ends:
                await asyncio.sleep(interval)
                state.rss_timeline.append({pid: rss_kib(pid) for pid in state.baseline_kib})
            await asyncio.sleep(max(0.0, ends - time.monotonic() - 0.5))
            state.final_kib = {pid: rss_kib(pid) for pid in state.baseline_kib}

        await asyncio.gather(*(worker(sessions[w::WORKERS]) for w in range(WORKERS)), sample_rss())
    return state


def soak_scenario(make_stack: MakeStack, seconds: float, scenario: str, *, check_latency: bool) -> None:
    stack = make_stack(replicas=3)
    state = asyncio.run(soak(stack, seconds))
    result = state.result
    # send_turn with give_up_after=0 makes one attempt: a failure is recorded, the turn is sent again later
    with stack.client() as client:
        audit = audit_sessions(client, list(state.turns), max(state.turns.values()), result.acked)
    measured = sorted((start, s) for start, s in result.latencies if start >= state.warmup_ends)
    third = len(measured) // 3
    first_p50 = p50([s for _, s in measured[:third]])
    last_p50 = p50([s for _, s in measured[-third:]])
    growth = {pid: (state.final_kib[pid] - base) / base for pid, base in state.baseline_kib.items()}
    record(
        scenario,
        seconds=seconds,
        replicas=3,
        client_workers=WORKERS,
        sessions=POOL,
        turns=len(result.acked),
        turns_per_second=round(len(result.acked) / seconds, 1),
        errors=sum(result.errors.values()),
        error_kinds=result.errors,
        lost=audit.lost,
        duplicated=audit.duplicated,
        interleaved=audit.interleaved,
        rss_baseline_mib={str(pid): round(kib / 1024, 1) for pid, kib in state.baseline_kib.items()},
        rss_final_mib={str(pid): round(kib / 1024, 1) for pid, kib in state.final_kib.items()},
        rss_growth_percent_max=round(max(growth.values()) * 100, 2),
        rss_timeline_mib=[[round(kib / 1024, 1) for kib in sample.values()] for sample in state.rss_timeline],
        p50_first_third_ms=round(first_p50 * 1000, 2),
        p50_last_third_ms=round(last_p50 * 1000, 2),
        p99_ms=round(percentile([s for _, s in measured], 0.99) * 1000, 2),
    )
    assert len(state.baseline_kib) == 3, "every replica must have served turns"
    assert not result.errors and not result.failed, result.errors
    assert audit.clean, audit.problems[:10]
    assert audit.stored_turns == len(result.acked)
    assert max(growth.values()) <= RSS_GROWTH_LIMIT, (
        f"RSS growth {growth} (KiB {state.baseline_kib} -> {state.final_kib})"
    )
    if check_latency:  # a timing target: only in the long soak run on its own (make soak), never in make test
        assert last_p50 <= first_p50 * 1.5 + 0.005, (
            f"p50 went from {first_p50 * 1000:.1f} ms to {last_p50 * 1000:.1f} ms"
        )


def test_30_second_soak_has_no_errors_and_flat_memory(make_stack: MakeStack) -> None:
    # p50 is recorded, not asserted: make test must pass on a busy machine (the 10-minute soak asserts it)
    soak_scenario(make_stack, 30, "soak_30s", check_latency=False)


@pytest.mark.slow
@pytest.mark.timeout(int(os.environ.get("SOAK_SECONDS", "600")) + 300)
def test_ten_minute_soak_has_no_errors_flat_memory_and_stable_latency(make_stack: MakeStack) -> None:
    soak_scenario(make_stack, float(os.environ.get("SOAK_SECONDS", "600")), "soak_10min", check_latency=True)
