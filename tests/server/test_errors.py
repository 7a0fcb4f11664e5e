"""The error contract: every failure is the right status with ``{"error": {"code", "message"}}``, fast,
and never a stack trace - 401, 404, 413, 422, 502 and 503."""

from __future__ import annotations

import base64
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import redis.asyncio as aioredis

from engram.history.store import HistoryStore
from testkit.redis_server import RedisServer, free_port
from tests.server.conftest import MakeService
from tests.server.support import ServiceProcess, chat, metric, register_tenant, scrape, service_env


def assert_error(response: httpx.Response, status: int, code: str | None = None) -> dict[str, str]:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    error = response.json()["error"]
    assert set(error) == {"code", "message"}
    assert error["message"] and "Traceback" not in response.text
    if code is not None:
        assert error["code"] == code, error
    return error


# --- a service with auth required and a model that cannot be reached ---------------------------------------
@pytest.fixture(scope="module")
def strict(module_redis: RedisServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServiceProcess]:
    closed_port = free_port()  # nothing listens there: every model call fails to connect
    env = service_env(
        module_redis.url,
        ENGRAM_AUTH="required",
        ENGRAM_LLM="openai-like",
        ENGRAM_LLM_BASE_URL=f"http://127.0.0.1:{closed_port}/v1",
        ENGRAM_LLM_MODEL="nowhere",
        ENGRAM_LLM_TIMEOUT="2",
    )
    process = ServiceProcess(env, tmp_path_factory.mktemp("strict") / "service.log").start()
    yield process
    process.stop()


def test_request_without_api_key_is_401(strict: ServiceProcess) -> None:
    assert_error(chat(strict.url, "s1", "hello"), 401, "unauthorized")
    assert_error(httpx.get(strict.url + "/v1/sessions"), 401, "unauthorized")


@pytest.mark.parametrize("header", ["Bearer egk_acme.not-the-key", "Bearer nonsense", "Basic abc", "Bearer"])
def test_request_with_wrong_or_malformed_api_key_is_401(strict: ServiceProcess, header: str) -> None:
    assert_error(chat(strict.url, "s1", "hello", headers={"Authorization": header}), 401, "unauthorized")


def test_model_failure_is_502_and_commits_nothing(strict: ServiceProcess, module_redis: RedisServer) -> None:
    api_key = register_tenant(module_redis.url, "acme")
    auth = {"Authorization": f"Bearer {api_key}"}
    session = f"broken-{uuid.uuid4().hex[:6]}"

    started = time.monotonic()
    assert_error(chat(strict.url, session, "hello?", headers=auth), 502, "model_failed")
    assert_error(chat(strict.url, session, "hello again?", headers=auth, stream=True), 502, "model_failed")
    assert time.monotonic() - started < 10

    # the tenant's token limit is 500: a message over it is refused before the model is asked
    over = assert_error(chat(strict.url, session, "word " * 600, headers=auth), 413, "message_too_large")
    assert "token limit of 500" in over["message"]

    messages = httpx.get(f"{strict.url}/v1/sessions/{session}/messages", headers=auth)
    assert messages.status_code == 200 and messages.json() == {"messages": [], "next": None}
    sessions = httpx.get(f"{strict.url}/v1/sessions", headers=auth).json()["sessions"]
    assert session not in [s["session_id"] for s in sessions]
    samples = scrape(strict.url)
    assert metric(samples, "engram_turns_total", outcome="model_error") == 2
    assert metric(samples, "engram_model_duration_seconds_count", outcome="error") == 2


async def test_api_key_reaches_only_its_own_tenants_sessions(strict: ServiceProcess, module_redis: RedisServer) -> None:
    acme, globex = register_tenant(module_redis.url, "acme"), register_tenant(module_redis.url, "globex")
    client = aioredis.Redis.from_url(module_redis.url, decode_responses=True)
    try:  # globex's conversation, written through the store (this service's model is down)
        await HistoryStore(client).commit_turn("globex", "globex-only", "t1", "secret plans", "noted")
    finally:
        await client.aclose()
    as_acme, as_globex = {"Authorization": f"Bearer {acme}"}, {"Authorization": f"Bearer {globex}"}
    async with httpx.AsyncClient(base_url=strict.url) as http:
        listed = (await http.get("/v1/sessions", headers=as_acme)).json()["sessions"]
        assert "globex-only" not in [s["session_id"] for s in listed]
        peek = await http.get("/v1/sessions/globex-only/messages", headers=as_acme)
        assert peek.json()["messages"] == []
        assert_error(await http.delete("/v1/sessions/globex-only", headers=as_acme), 404, "not_found")

        own = (await http.get("/v1/sessions/globex-only/messages", headers=as_globex)).json()["messages"]
        assert [m["content"] for m in own] == ["secret plans", "noted"]


# --- input errors, on the shared echo service ---------------------------------------------------------------
def test_message_over_the_size_limit_is_413_and_one_at_the_limit_is_accepted(service: ServiceProcess) -> None:
    limit = 32 * 1024
    error = assert_error(chat(service.url, "big", "é" * (limit // 2) + "x"), 413, "message_too_large")
    assert str(limit) in error["message"]
    assert chat(service.url, "big", "x" * limit).status_code == 200
    follow_up = chat(service.url, "big", "and now?")  # the echo quotes 32 KiB: its reply must still fit
    assert follow_up.status_code == 200, follow_up.text


def test_request_body_far_over_the_limit_is_413_without_parsing_it(service: ServiceProcess) -> None:
    response = httpx.post(
        service.url + "/v1/chat",
        content=b'{"session_id": "s", "message": "' + b"x" * 1_000_000 + b'"}',
        headers={"content-type": "application/json"},
    )
    assert_error(response, 413, "request_too_large")


@pytest.mark.parametrize("session_id", ["has space", "a:b", "{tag}", "", "-leading-dash", "x" * 129, "ünï"])
def test_invalid_session_id_is_422(service: ServiceProcess, session_id: str) -> None:
    assert_error(chat(service.url, session_id, "hello"), 422, "invalid_session_id")


@pytest.mark.parametrize(
    ("body", "code"),
    [
        (b"{not json", "invalid_request"),
        (b'{"session_id": "s"}', "invalid_request"),
        (b'{"session_id": "s", "message": 5}', "invalid_request"),
        (b'{"session_id": "s", "message": "   "}', "invalid_message"),
        (b'{"session_id": "s", "message": "hi", "turn_id": "bad turn id"}', "invalid_message"),
        (b'{"session_id": "s", "message": "\\ud800"}', "invalid_message"),
        (b"[]", "invalid_request"),
        (b'{"session_id": "s", "message": "hi", "stream": 0}', "invalid_request"),
    ],
)
def test_malformed_chat_body_is_422(service: ServiceProcess, body: bytes, code: str) -> None:
    response = httpx.post(service.url + "/v1/chat", content=body, headers={"content-type": "application/json"})
    assert_error(response, 422, code)


def test_bad_pagination_is_422(service: ServiceProcess) -> None:
    assert_error(httpx.get(service.url + "/v1/sessions?cursor=%%%"), 422, "invalid_cursor")
    assert_error(httpx.get(service.url + "/v1/sessions?limit=0"), 422, "invalid_request")
    assert_error(httpx.get(service.url + "/v1/sessions/s/messages?cursor=bm9wZQ"), 422, "invalid_cursor")
    assert_error(httpx.get(service.url + "/v1/sessions/bad%20id/messages"), 422, "invalid_session_id")


def _cursor(value: str) -> str:
    return base64.urlsafe_b64encode(value.encode()).decode().rstrip("=")


MAX_ID_PART = str(2**64 - 1)


@pytest.mark.parametrize(
    ("path", "cursor"),
    [
        ("/v1/sessions/s/messages", _cursor(f"{2**64}-0")),  # parts above 64 bits: Redis' "Invalid stream ID"
        ("/v1/sessions/s/messages", _cursor(f"0-{2**64}")),
        ("/v1/sessions/s/messages", _cursor(f"{MAX_ID_PART}-{MAX_ID_PART}")),  # nothing comes after it
        ("/v1/sessions/s/messages", _cursor("007-1")),
        ("/v1/sessions/s/messages", "A" * 600),
        ("/v1/sessions", _cursor("not a session id")),
        ("/v1/sessions", _cursor("s" * 129)),
        ("/v1/sessions", "A" * 600),
    ],
    ids=["ms-over-64-bits", "seq-over-64-bits", "max-id", "leading-zero", "too-long", "bad-session-id",
         "session-id-too-long", "sessions-too-long"],
)  # fmt: skip
def test_every_invalid_cursor_is_422_invalid_cursor(service: ServiceProcess, path: str, cursor: str) -> None:
    assert_error(httpx.get(service.url + path, params={"cursor": cursor}), 422, "invalid_cursor")


def test_unknown_route_and_method_are_json_errors(service: ServiceProcess) -> None:
    assert_error(httpx.get(service.url + "/v2/nothing"), 404, "not_found")
    assert_error(httpx.put(service.url + "/v1/chat"), 405, "method_not_allowed")
    assert_error(httpx.delete(service.url + "/v1/sessions/never-existed"), 404, "not_found")


# --- Redis down: 503 fast, and recovery without a restart --------------------------------------------------
def test_redis_outage_gives_fast_503s_and_the_service_recovers_by_itself(
    tmp_path: Path, make_service: MakeService
) -> None:
    server = RedisServer(tmp_path / "redis")  # not started: the service comes up before Redis
    replica = make_service(server.url).spawn().wait("/healthz")
    try:
        assert httpx.get(replica.url + "/readyz").status_code == 503
        assert_error(chat(replica.url, "outage", "anyone?"), 503, "store_unavailable")

        server.start()
        replica.wait("/readyz", timeout=30)
        assert chat(replica.url, "outage", "remember the number 7").status_code == 200

        server.kill()
        for request in (
            lambda: chat(replica.url, "outage", "still there?"),
            lambda: httpx.get(replica.url + "/v1/sessions"),
            lambda: httpx.get(replica.url + "/v1/sessions/outage/messages"),
        ):
            started = time.monotonic()
            response = request()
            assert time.monotonic() - started < 1.5, "a 503 must come within about a second"
            assert_error(response, 503, "store_unavailable")
            assert response.headers["Retry-After"] == "1"
        assert httpx.get(replica.url + "/readyz").status_code == 503
        assert httpx.get(replica.url + "/healthz").status_code == 200

        server.start()  # same data dir: the AOF brings the conversation back
        replica.wait("/readyz", timeout=30)
        again = chat(replica.url, "outage", "what number?")
        assert again.status_code == 200 and '"remember the number 7"' in again.json()["reply"]
        samples = scrape(replica.url)
        assert metric(samples, "engram_redis_errors_total") >= 4
        assert metric(samples, "engram_turns_total", outcome="store_unavailable") == 2
        assert "Redis is unreachable at start-up" in replica.log()
        assert replica.process is not None and replica.process.poll() is None  # never crashed
    finally:
        server.stop()
