"""Tenants in production, through real ``engram serve`` replicas over HTTP: the request rate across
replicas (429), session and storage quotas (403), export as JSON Lines at constant memory, and erasure
by subject."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import Iterator

import httpx
import pytest
import redis

from engram.history.store import HistoryStore
from engram.messages import NewMessage
from engram.policy import Policy
from testkit.redis_server import RedisServer
from tests.server.conftest import MakeService
from tests.server.support import (
    ServiceProcess,
    chat,
    metric,
    process_group_rss,
    register_tenant,
    scrape,
    service_env,
    start_all,
)


def assert_error(response: httpx.Response, status: int, code: str) -> dict[str, str]:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    error = response.json()["error"]
    assert error["code"] == code and error["message"] and "Traceback" not in response.text
    return error


@pytest.fixture(scope="module")
def quota_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path_factory.mktemp("redis")).start()
    yield server
    server.stop()


def test_the_request_rate_holds_across_three_replicas(quota_redis: RedisServer, make_service: MakeService) -> None:
    rate, burst, seconds = 40, 10, 4.0
    replicas = start_all(
        make_service(quota_redis.url, ENGRAM_REQUESTS_PER_SECOND=str(rate), ENGRAM_BURST=str(burst)) for _ in range(3)
    )
    statuses: list[int] = []
    retry_after: set[str] = set()

    async def client(n: int, ready: asyncio.Barrier, seconds: float) -> None:
        async with httpx.AsyncClient(base_url=replicas[n % 3].url, timeout=15) as http:
            # warm up (connections open, replicas past their first requests), then let the burst refill:
            # GCRA does not bank the time in which no request reached Redis
            await http.post("/v1/chat", json={"session_id": f"rate-{n}", "message": "warm-up"})
            await ready.wait()
            await asyncio.sleep(2 * burst / rate)
            until = time.monotonic() + seconds
            turn = 0
            while time.monotonic() < until:
                body = {"session_id": f"rate-{n}", "message": f"m{turn}"}
                response = await http.post("/v1/chat", json=body)
                statuses.append(response.status_code)
                if response.status_code == 429:
                    retry_after.add(response.headers["retry-after"])
                    assert response.json()["error"]["code"] == "rate_limited"
                turn += 1

    async def load() -> float:
        ready = asyncio.Barrier(12)
        await asyncio.gather(*(client(n, ready, seconds) for n in range(12)))
        return seconds

    elapsed = asyncio.run(load())
    accepted = statuses.count(200)
    expected = burst + rate * elapsed
    assert set(statuses) == {200, 429}  # (the warm-up requests are not counted)
    assert abs(accepted - expected) <= 0.1 * expected, (accepted, expected, len(statuses))
    assert retry_after == {"1"}  # at 40/s the next slot is never more than a second away
    assert metric(scrape(replicas[0].url), "engram_quota_rejections_total", reason="rate_limited") > 0


@pytest.fixture(scope="module")
def limited(quota_redis: RedisServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServiceProcess]:
    """A replica of tenant "default" (auth disabled) at 3 sessions and 2,000 bytes."""
    env = service_env(quota_redis.url, ENGRAM_MAX_SESSIONS="3", ENGRAM_MAX_STORED_BYTES="2000", ENGRAM_NAMESPACE="q")
    process = ServiceProcess(env, tmp_path_factory.mktemp("limited") / "service.log").start()
    yield process
    process.stop()


def test_a_new_session_over_the_quota_is_403_and_stores_nothing(limited: ServiceProcess) -> None:
    for session in ("s1", "s2", "s3"):
        assert chat(limited.url, session, "hello").status_code == 200
    error = assert_error(chat(limited.url, "s4", "one too many"), 403, "session_quota_exceeded")
    assert "3 sessions" in error["message"]
    assert httpx.get(limited.url + "/v1/sessions/s4/messages").json()["messages"] == []
    assert chat(limited.url, "s1", "an existing session goes on").status_code == 200
    samples = scrape(limited.url)
    assert metric(samples, "engram_tenant_sessions", tenant="default") == 3
    assert metric(samples, "engram_tenant_stored_bytes", tenant="default") > 0
    assert metric(samples, "engram_quota_rejections_total", reason="session_quota_exceeded") == 1


def test_a_turn_over_the_storage_quota_is_403_and_nothing_is_half_stored(limited: ServiceProcess) -> None:
    before = httpx.get(limited.url + "/v1/sessions/s2/messages").json()["messages"]
    error = assert_error(chat(limited.url, "s2", "x" * 1900), 403, "storage_quota_exceeded")
    assert "of 2000 bytes" in error["message"]
    assert httpx.get(limited.url + "/v1/sessions/s2/messages").json()["messages"] == before
    # OpenAI's route: the same refusal in OpenAI's shape, and not 429 (its SDKs would retry that by themselves)
    body = {"model": "echo", "messages": [{"role": "user", "content": "y" * 1900}]}
    response = httpx.post(limited.url + "/v1/chat/completions", json=body, headers={"X-Engram-Session": "s2"})
    assert response.status_code == 403, response.text
    assert response.json()["error"]["code"] == "storage_quota_exceeded"


def test_export_streams_every_message_as_json_lines(quota_redis: RedisServer, make_service: MakeService) -> None:
    service = make_service(quota_redis.url, ENGRAM_NAMESPACE="exp").start()
    for i in range(3):
        assert chat(service.url, "e1", f"message {i}").status_code == 200
    response = httpx.get(service.url + "/v1/sessions/e1/export")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("application/x-ndjson")
    lines = [json.loads(line) for line in response.text.splitlines()]
    assert [line["type"] for line in lines] == ["message"] * 6 + ["end"]
    assert [line["message"]["role"] for line in lines[:-1]] == ["user", "assistant"] * 3
    assert [line["message"]["content"] for line in lines[:-1:2]] == [f"message {i}" for i in range(3)]
    assert lines[-1] == {"type": "end", "session_id": "e1", "messages": 6}
    assert_error(httpx.get(service.url + "/v1/sessions/nobody/export"), 404, "not_found")
    assert_error(httpx.get(service.url + "/v1/sessions/bad%20id/export"), 422, "invalid_session_id")


def test_exporting_10000_messages_keeps_the_replica_memory_flat(
    quota_redis: RedisServer, make_service: MakeService
) -> None:
    service = make_service(quota_redis.url, ENGRAM_NAMESPACE="big").start()
    content = "z" * 4000  # 10,000 x 4 KB: an export held in memory would add 40 MB or more

    async def fill() -> None:
        store = HistoryStore(redis.asyncio.Redis.from_url(quota_redis.url))
        store.keys = type(store.keys)("big")
        for _ in range(100):
            messages = [NewMessage("user", content, tokens=1)] * 100
            await store.append("default", "long", messages, Policy(max_messages_per_session=20_000))
        await store.client.aclose()

    asyncio.run(fill())
    assert chat(service.url, "warm-up", "hello").status_code == 200
    baseline = process_group_rss(service.process.pid)  # type: ignore[union-attr]
    peak, count, received = baseline, 0, 0
    with httpx.stream("GET", service.url + "/v1/sessions/long/export", timeout=60) as response:
        assert response.status_code == 200
        for line in response.iter_lines():
            count += 1
            received += len(line)
            if count % 1000 == 0:
                peak = max(peak, process_group_rss(service.process.pid))  # type: ignore[union-attr]
    assert count == 10_001 and received > 40_000_000
    assert peak - baseline < 15 * 1024 * 1024, f"RSS grew {(peak - baseline) / 2**20:.1f} MiB"


def test_erasing_a_subject_over_http_leaves_nothing_in_redis(
    quota_redis: RedisServer, make_service: MakeService
) -> None:
    service = make_service(quota_redis.url, ENGRAM_NAMESPACE="gdpr").start()
    assert chat(service.url, "c1", "I am Carol", subject="carol@example.com").status_code == 200
    body = {"model": "echo", "messages": [{"role": "user", "content": "me again"}], "metadata": {}}
    body["metadata"] = {"session_id": "c2", "subject": "carol@example.com"}
    assert httpx.post(service.url + "/v1/chat/completions", json=body).status_code == 200
    assert chat(service.url, "d1", "I am Dave", subject="dave").status_code == 200
    assert_error(chat(service.url, "c1", "not carol", subject="dave"), 409, "subject_mismatch")
    assert_error(chat(service.url, "c3", "bad", subject="white space"), 422, "invalid_subject")

    response = httpx.delete(service.url + "/v1/subjects/carol@example.com")
    assert response.status_code == 200 and response.json() == {"subject": "carol@example.com", "sessions_deleted": 2}
    assert httpx.delete(service.url + "/v1/subjects/carol@example.com").json()["sessions_deleted"] == 0

    with redis.Redis.from_url(quota_redis.url, decode_responses=True) as admin:
        keys = list(admin.scan_iter(match="gdpr:*"))
        assert not [k for k in keys if "c1" in k or "c2" in k or "carol" in k], keys
        assert admin.zrange("gdpr:default:sessions", 0, -1) == ["d1"]
        assert set(admin.hkeys("gdpr:default:usage")) == {":bytes", "d1"}
    assert [s["session_id"] for s in httpx.get(service.url + "/v1/sessions").json()["sessions"]] == ["d1"]


def test_a_quota_changed_on_the_tenant_applies_within_the_tenant_cache_lifetime(
    quota_redis: RedisServer, make_service: MakeService
) -> None:
    tenant = f"t{uuid.uuid4().hex[:8]}"
    api_key = register_tenant(quota_redis.url, tenant, Policy())
    service = make_service(quota_redis.url, ENGRAM_AUTH="required", ENGRAM_TENANT_CACHE_SECONDS="1").start()
    headers = {"Authorization": f"Bearer {api_key}"}
    assert chat(service.url, "first", "hello", headers=headers).status_code == 200
    register_tenant(quota_redis.url, tenant, Policy(max_sessions=1), api_key=api_key)  # what the operator writes
    changed = time.monotonic()
    while chat(service.url, f"new-{time.monotonic()}", "hello", headers=headers).status_code != 403:
        assert time.monotonic() - changed < 10, "the new quota was not applied"
        time.sleep(0.1)
    # bounded by the cache lifetime (1 s), plus what a busy machine adds to a request
    assert time.monotonic() - changed < 1 + 5
