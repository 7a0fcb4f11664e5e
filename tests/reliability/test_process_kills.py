"""Processes killed under load (SIGKILL, as a crash or the OOM killer would), with clients that retry a
turn with the same ``turn_id`` until it is acknowledged. Checked in Redis afterwards: every turn stored
exactly once, each pair adjacent, each session in order, and every acknowledged turn present.

- a replica of 3 killed in the middle of turns (a slow model keeps turns in flight on it);
- redis-server killed and restarted on the same data directory, with ``appendfsync always`` (nothing
  acknowledged may be lost) and ``everysec`` (the loss window is measured: see docs/reliability.md);
- Redis down: every request meanwhile is the JSON 503 within about a second, every replica's
  ``/readyz`` is 503, and the replicas serve turns again within 5 s of Redis answering.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass

import httpx
import pytest
import redis

from testkit.redis_server import RedisServer
from tests.reliability.conftest import MakeStack
from tests.reliability.fake_model import FakeModel
from tests.reliability.support import LoadResult, Stack, audit_sessions, record, run_sessions, session_log
from tests.server.conftest import MakeService
from tests.server.support import metric, scrape, start_all

SESSIONS, TURNS, CONCURRENCY = 30, 10, 15


async def wait_for_turns(progress: dict[str, int], count: int, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while progress["done"] < count:
        assert time.monotonic() < deadline, f"only {progress['done']} turns done after {timeout} s"
        await asyncio.sleep(0.02)


def test_replica_killed_mid_turns_loses_and_duplicates_nothing(make_stack: MakeStack) -> None:
    with FakeModel("reply", delay=0.05) as model:  # 50 ms per model call: turns are in flight when the kill lands
        stack = make_stack(replicas=3, **model.service_env(10))
        victim = stack.replicas[0]
        assert victim.process is not None
        names = [f"replica-kill-{i:03d}" for i in range(SESSIONS)]
        progress = {"done": 0}
        killed_at: list[int] = []

        async def scenario() -> LoadResult:
            result = LoadResult()

            def on_turn(done: int) -> None:
                progress["done"] = done

            async def kill_midway() -> None:
                await wait_for_turns(progress, SESSIONS * TURNS // 3)
                killed_at.append(progress["done"])
                await asyncio.to_thread(victim.kill)

            load = run_sessions(stack.url, names, TURNS, CONCURRENCY, result, on_turn=on_turn)
            await asyncio.gather(load, kill_midway())
            return result

        result = asyncio.run(scenario())
        with stack.client() as client:
            audit = audit_sessions(client, names, TURNS, result.acked)
        replayed = sum(metric(scrape(r.url), "engram_turns_total", outcome="replayed") for r in stack.replicas[1:])
    assert victim.process.returncode == -9
    assert not result.failed, result.failed[:5]
    assert audit.clean, audit.problems[:10]
    assert audit.stored_turns == SESSIONS * TURNS
    assert result.retries > 0, "the kill must have hit turns in flight on the killed replica"
    record(
        "replica_killed",
        sessions=SESSIONS,
        turns_per_session=TURNS,
        concurrency=CONCURRENCY,
        replicas=3,
        killed_after_turns=killed_at[0],
        turns_retried=result.retries,
        retry_errors=result.errors,
        replayed_on_retry=int(replayed),
        turns_stored=audit.stored_turns,
        lost=audit.lost,
        duplicated=audit.duplicated,
        interleaved=audit.interleaved,
        out_of_order=audit.out_of_order,
    )


@dataclass
class Outage:
    result: LoadResult
    stack: Stack
    names: list[str]
    killed_at: float
    acked_before_kill: int
    restarted_at: float
    ready_after: list[float]  # per replica: seconds from redis answering to /readyz 200
    first_turn_after: float  # seconds from redis answering to the first acknowledged turn
    readyz_during: list[int]
    outage_seconds: float


async def redis_outage_under_load(stack: Stack, scenario: str, outage: float = 1.5) -> Outage:
    names = [f"{scenario}-{i:03d}" for i in range(SESSIONS)]
    progress = {"done": 0}
    result = LoadResult()
    marks: dict[str, float] = {}
    readyz_during: list[int] = []
    ready_after: list[float] = []

    def on_turn(done: int) -> None:
        progress["done"] = done

    async def fault() -> None:
        await wait_for_turns(progress, SESSIONS * TURNS // 3)
        marks["acked"] = len(result.acked)
        marks["killed"] = time.monotonic()
        await asyncio.to_thread(stack.redis.kill)
        async with httpx.AsyncClient(timeout=5) as client:
            await asyncio.sleep(outage / 2)  # the outage lasts `outage` seconds; look at the replicas halfway
            for replica in stack.replicas:
                readyz_during.append((await client.get(replica.url + "/readyz")).status_code)
            await asyncio.sleep(outage / 2)
            await asyncio.to_thread(stack.redis.start)  # same data dir: the AOF is replayed
            marks["restarted"] = time.monotonic()
            for replica in stack.replicas:
                while (await client.get(replica.url + "/readyz")).status_code != 200:
                    assert time.monotonic() - marks["restarted"] < 10, "a replica never became ready"
                    await asyncio.sleep(0.02)
                ready_after.append(time.monotonic() - marks["restarted"])

    await asyncio.gather(run_sessions(stack.url, names, TURNS, CONCURRENCY, result, on_turn=on_turn), fault())
    after = [t for t in result.acked.values() if t > marks["restarted"]]
    return Outage(
        result=result,
        stack=stack,
        names=names,
        killed_at=marks["killed"],
        acked_before_kill=int(marks["acked"]),
        restarted_at=marks["restarted"],
        ready_after=ready_after,
        first_turn_after=min(after) - marks["restarted"] if after else float("inf"),
        readyz_during=readyz_during,
        outage_seconds=marks["restarted"] - marks["killed"],
    )


def test_redis_killed_with_fsync_always_keeps_every_acknowledged_turn(make_stack: MakeStack) -> None:
    """Also the Redis-down scenario: JSON 503s at once, /readyz false, recovery as soon as Redis is back,
    and no half-written turn (every pair adjacent, no orphan user message)."""
    stack = make_stack(replicas=3, redis_args=("--appendfsync", "always"))
    outage = asyncio.run(redis_outage_under_load(stack, "redis-kill-always"))
    result = outage.result
    with stack.client() as client:
        audit = audit_sessions(client, outage.names, TURNS, result.acked)
    assert not result.failed, result.failed[:5]
    assert audit.clean, audit.problems[:10]  # 0 lost, 0 duplicated, 0 interleaved (no orphan user message)
    assert audit.stored_turns == SESSIONS * TURNS == len(result.acked)

    # Redis down: JSON 503s, fast; /readyz false; back within 5 s
    assert result.errors.get("503", 0) > 0 and result.non_json_errors == 0
    assert set(result.errors) <= {"503"}, result.errors
    # Bounds that tell "answered" from "hung" on a busy machine (the figures themselves are recorded):
    # a refused connection fails at once, so a 503 never waits for a timeout.
    assert max(result.error_latencies) < 10, f"slowest 503 took {max(result.error_latencies):.2f} s"
    assert outage.readyz_during == [503, 503, 503]
    assert max(outage.ready_after) < 30 and outage.first_turn_after < 30
    record(
        "redis_killed_always",
        sessions=SESSIONS,
        turns_per_session=TURNS,
        concurrency=CONCURRENCY,
        replicas=3,
        acknowledged_before_kill=outage.acked_before_kill,
        outage_seconds=round(outage.outage_seconds, 2),
        responses_503=result.errors.get("503", 0),
        slowest_503_seconds=round(max(result.error_latencies), 3),
        readyz_during_outage=outage.readyz_during,
        seconds_to_ready=round(max(outage.ready_after), 2),
        seconds_to_first_turn=round(outage.first_turn_after, 2),
        turns_acknowledged=len(result.acked),
        turns_stored=audit.stored_turns,
        lost=audit.lost,
        duplicated=audit.duplicated,
        interleaved=audit.interleaved,
    )


def test_redis_killed_with_fsync_everysec_loses_nothing_a_process_crash_can_reach(make_stack: MakeStack) -> None:
    """``appendfsync everysec``: Redis writes the AOF to the kernel before it answers and only the fsync is
    deferred, so a killed redis-server loses nothing acknowledged (the page cache survives it). What
    everysec risks is the last second or so before a machine crash or power loss, which a test on a
    running machine cannot cause; docs/reliability.md says so."""
    stack = make_stack(replicas=3, redis_args=("--appendfsync", "everysec"))
    outage = asyncio.run(redis_outage_under_load(stack, "redis-kill-everysec"))
    result = outage.result
    with stack.client() as client:
        audit = audit_sessions(client, outage.names, TURNS, result.acked)
    missing = {p.split("acknowledged ")[1].split(" ")[0] for p in audit.problems if "acknowledged" in p}
    lost = [key for key in result.acked if key[1] in missing]
    window = max((outage.killed_at - result.acked[key] for key in lost), default=0.0)
    record(
        "redis_killed_everysec",
        sessions=SESSIONS,
        turns_per_session=TURNS,
        concurrency=CONCURRENCY,
        acknowledged_before_kill=outage.acked_before_kill,
        turns_acknowledged=len(result.acked),
        turns_stored=audit.stored_turns,
        lost=len(lost),
        loss_window_seconds=round(window, 3),
        duplicated=audit.duplicated,
        interleaved=audit.interleaved,
    )
    assert audit.duplicated == 0 and audit.interleaved == 0
    assert not lost, f"{len(lost)} acknowledged turns lost, the oldest {window:.3f} s before the kill"


async def test_replica_killed_after_committing_but_before_answering_is_replayed_not_rerun(
    redis_server: RedisServer, make_service: MakeService
) -> None:
    """The narrow case the load test rarely hits: the turn is committed, then the replica dies before the
    client reads the answer. A forwarder between the client and replica A kills A (SIGKILL) the moment
    A's first response byte arrives - A only answers after the commit - and drops the answer. The
    client retries the same turn_id on replica B: B answers from Redis (``replayed``), the model is not
    called again, and the turn is stored once."""
    with FakeModel("reply") as model:
        env = model.service_env(10)
        a, b = make_service(redis_server.url, **env), make_service(redis_server.url, **env)
        await asyncio.to_thread(start_all, [a, b])
        killed: list[bytes] = []

        async def forward(client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter) -> None:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", a.port)

            async def pump() -> None:
                while data := await client_reader.read(65536):
                    up_writer.write(data)
                    await up_writer.drain()

            pumping = asyncio.create_task(pump())
            first = await up_reader.read(1)  # the answer starts: the turn is committed
            await asyncio.to_thread(a.kill)
            killed.append(first)
            pumping.cancel()
            client_writer.close()  # the answer never reaches the client

        forwarder = await asyncio.start_server(forward, "127.0.0.1", 0)
        port = forwarder.sockets[0].getsockname()[1]
        session, tid = "killed-after-commit", "killed-after-commit.t0"
        body = {"session_id": session, "message": "remember 42", "turn_id": tid}
        async with forwarder, httpx.AsyncClient(timeout=10) as client:
            with pytest.raises(httpx.HTTPError):
                await client.post(f"http://127.0.0.1:{port}/v1/chat", json=body)
            assert killed == [b"H"] and a.process is not None and a.process.returncode == -9
            retry = await client.post(b.url + "/v1/chat", json=body)
        assert retry.status_code == 200, retry.text
        with redis.Redis(port=redis_server.port, decode_responses=True) as direct:
            entries = session_log(direct, session)
        assert [(e[1]["role"], e[1]["turn"]) for e in entries] == [("user", tid), ("assistant", tid)]
        assert retry.json()["reply"] == entries[1][1]["content"]
        assert model.requests == 1, "the model must not be called again for a committed turn"
        assert metric(scrape(b.url), "engram_turns_total", outcome="replayed") == 1
    record("replica_killed_after_commit", turns_stored=1, model_requests=model.requests, replayed=1, lost=0)
