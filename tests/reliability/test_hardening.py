"""What an adversarial run broke, reproduced with real processes (issue 16): a full or read-only Redis
found before the model runs, honest answers when a commit's outcome is unknown, bursts that wait for a
connection instead of failing, model errors that never carry their text (or a key) to clients, and a
public /readyz that says what is wrong but not where Redis is."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import threading
import time

import httpx
import redis

from testkit.redis_server import RedisServer
from tests.reliability.conftest import MakeStack
from tests.reliability.fake_model import FakeModel
from tests.reliability.support import KEYS, TENANT, record
from tests.server.conftest import MakeService
from tests.server.support import ServiceProcess, chat


def fill_until_full(client: redis.Redis) -> None:
    """Lower maxmemory well under what is used, so that Redis refuses every write (noeviction)."""
    used = int(client.info("memory")["used_memory"])
    client.config_set("maxmemory-policy", "noeviction")
    client.config_set("maxmemory", str(used // 2))


def replica_after_one_turn(
    redis_server: RedisServer, make_service: MakeService, model: FakeModel
) -> tuple[ServiceProcess, int]:
    """A replica over ``model`` whose session s1 holds one turn; and how often the model was called."""
    replica = make_service(redis_server.url, **model.service_env(5.0)).start()
    assert chat(replica.url, "s1", "remember this").status_code == 200
    return replica, model.requests


def test_a_full_redis_answers_507_before_the_model_runs_and_deleting_a_session_frees_space(
    redis_server: RedisServer, make_service: MakeService
) -> None:
    admin = redis.Redis(port=redis_server.port, decode_responses=True)
    with FakeModel() as model:
        replica, calls_before = replica_after_one_turn(redis_server, make_service, model)
        fill_until_full(admin)

        for stream in (False, True):
            response = chat(replica.url, "s1", "and this?", stream=stream)
            assert response.status_code == 507, response.text
            assert response.json()["error"]["code"] == "store_full"
        assert model.requests == calls_before  # refused by the load, before any model call
        assert admin.xlen(KEYS.session(TENANT, "s1").log) == 2  # what was stored is intact

        # degraded, not unready: taking every replica out of the Service would also stop the deletes below
        ready = httpx.get(replica.url + "/readyz")
        assert ready.status_code == 200 and ready.json()["status"] == "degraded"
        assert ready.json()["detail"] == "Redis is full (maxmemory)"

        deleted = httpx.delete(replica.url + "/v1/sessions/s1")  # a tenant can still free space
        assert deleted.status_code in (200, 204), deleted.text
        assert admin.exists(KEYS.session(TENANT, "s1").log) == 0

        admin.config_set("maxmemory", "0")
        assert httpx.get(replica.url + "/readyz").json()["status"] == "ok"
        assert chat(replica.url, "s2", "room again").status_code == 200
    record("store_full", turns=2, status=507, model_calls=0, readyz="200 degraded", delete_status=deleted.status_code)


def test_a_read_only_redis_answers_503_with_retry_after_before_the_model_runs(
    redis_server: RedisServer, make_service: MakeService
) -> None:
    admin = redis.Redis(port=redis_server.port, decode_responses=True)
    with FakeModel() as model:
        replica, calls_before = replica_after_one_turn(redis_server, make_service, model)
        admin.replicaof("127.0.0.1", "1")  # a replica of nothing: read-only, as during a failover
        try:
            response = chat(replica.url, "s1", "still there?")
            assert response.status_code == 503, response.text
            assert response.json()["error"]["code"] == "store_read_only"
            assert response.headers["Retry-After"] == "1"
            assert model.requests == calls_before
            ready = httpx.get(replica.url + "/readyz")
            assert ready.status_code == 200 and ready.json()["status"] == "degraded"
            assert ready.json()["detail"] == "Redis refuses writes (read-only replica or too few replicas)"
        finally:
            admin.replicaof("NO", "ONE")
        assert httpx.get(replica.url + "/readyz").json()["status"] == "ok"
        assert chat(replica.url, "s1", "back").status_code == 200
    record("store_read_only", status=503, model_calls=0, readyz="200 degraded")


def test_a_commit_without_answer_is_503_outcome_unknown_with_a_turn_id_whose_retry_never_stores_twice(
    redis_server: RedisServer, make_service: MakeService
) -> None:
    admin = redis.Redis(port=redis_server.port, decode_responses=True)
    log = KEYS.session(TENANT, "frozen").log
    with FakeModel(delay=1.0) as model:
        replica = make_service(redis_server.url, ENGRAM_REDIS_SOCKET_TIMEOUT="0.5", **model.service_env(10.0)).start()
        assert redis_server.process is not None
        answer: list[httpx.Response] = []
        client = threading.Thread(target=lambda: answer.append(chat(replica.url, "frozen", "hi")))  # no turn_id
        client.start()
        assert model.arrived.wait(30)  # the load is done; the model is "thinking"
        os.kill(redis_server.process.pid, signal.SIGSTOP)  # Redis freezes: the commit will get no answer
        try:
            client.join(30)
        finally:
            os.kill(redis_server.process.pid, signal.SIGCONT)  # and then runs what it had queued
        [response] = answer
        assert response.status_code == 503, response.text
        error = response.json()["error"]
        assert error["code"] == "outcome_unknown" and response.headers["Retry-After"] == "1"
        turn_id = error["turn_id"]  # made by the server: the client sent none
        assert turn_id in error["message"]

        retried = chat(replica.url, "frozen", "hi", turn_id=turn_id)
        assert retried.status_code == 200, retried.text
        assert retried.json()["turn_id"] == turn_id
        assert admin.xlen(log) == 2  # one user message, one reply: never twice
    record("commit_outcome_unknown", status=503, messages_after_retry=admin.xlen(log))


def test_model_errors_reach_clients_as_a_summary_without_their_text_or_the_api_key(
    redis_server: RedisServer, make_service: MakeService
) -> None:
    secret = "sk-test-" + "k" * 24
    with FakeModel("echo-error") as model:
        replica = make_service(redis_server.url, ENGRAM_LLM_API_KEY=secret, **model.service_env(5.0)).start()
        for stream in (False, True):
            response = chat(replica.url, f"leak-{int(stream)}", "hello", stream=stream)
            assert response.status_code == 502, response.text
            assert secret in model.last_headers  # the model server saw the key and echoed it back...
            message = response.json()["error"]["message"]
            assert secret not in response.text and "upstream rejected" not in response.text  # ...not to tenants
            assert "status 500" in message
        assert secret not in replica.log()  # nor into the service log
    record("model_error_text", turns=2, status=502, key_in_answers=0, key_in_log=0)


def test_too_few_replicas_for_min_replicas_to_write_is_503_not_500(
    redis_server: RedisServer, make_service: MakeService
) -> None:
    admin = redis.Redis(port=redis_server.port, decode_responses=True)
    replica = make_service(redis_server.url).start()
    admin.config_set("min-replicas-to-write", "1")  # and there is none: Redis answers -NOREPLICAS
    try:
        response = chat(replica.url, "s1", "hello")
        assert response.status_code == 503, response.text
        assert response.json()["error"]["code"] == "store_read_only"
        assert httpx.get(replica.url + "/readyz").json()["status"] == "degraded"
    finally:
        admin.config_set("min-replicas-to-write", "0")
    assert chat(replica.url, "s1", "hello").status_code == 200


def test_readyz_does_not_say_where_redis_is(redis_server: RedisServer, make_service: MakeService) -> None:
    replica = make_service(redis_server.url).start()
    redis_server.stop()
    response = httpx.get(replica.url + "/readyz")
    assert response.status_code == 503
    assert response.json()["detail"] == "Redis does not answer"
    assert str(redis_server.port) not in response.text and "127.0.0.1" not in response.text


async def burst(url: str, turns: int) -> tuple[dict[int, int], float]:
    """``turns`` first turns of new sessions, all at once; status counts and the p99 latency."""
    limits = httpx.Limits(max_connections=turns, max_keepalive_connections=turns)
    async with httpx.AsyncClient(base_url=url, timeout=60.0, limits=limits) as client:

        async def one(n: int) -> tuple[int, float]:
            started = time.monotonic()
            response = await client.post("/v1/chat", json={"session_id": f"burst-{n}", "message": "hello"})
            return response.status_code, time.monotonic() - started

        results = await asyncio.gather(*(one(n) for n in range(turns)))
    statuses: dict[int, int] = {}
    for status, _ in results:
        statuses[status] = statuses.get(status, 0) + 1
    latencies = sorted(seconds for _, seconds in results)
    return statuses, latencies[int(0.99 * (len(latencies) - 1))]


def test_a_burst_of_200_concurrent_turns_on_one_replica_gets_no_error_while_redis_is_healthy(
    redis_server: RedisServer, make_service: MakeService
) -> None:
    # Fewer connections than concurrent turns: the pool must make the excess wait, not fail.
    replica = make_service(redis_server.url, ENGRAM_REDIS_MAX_CONNECTIONS="16").start()
    statuses, p99 = asyncio.run(burst(replica.url, 200))
    assert statuses == {200: 200}, statuses
    record("burst_200_one_replica", statuses=statuses, p99_s=round(p99, 3))


def test_a_turn_id_reused_for_another_message_is_409_and_changes_nothing(
    redis_server: RedisServer, make_service: MakeService
) -> None:
    admin = redis.Redis(port=redis_server.port, decode_responses=True)
    replica = make_service(redis_server.url).start()
    first = chat(replica.url, "s1", "my name is Ada", turn_id="t1")
    assert first.status_code == 200
    for stream in (False, True):
        reused = chat(replica.url, "s1", "delete everything", turn_id="t1", stream=stream)
        assert reused.status_code == 409, reused.text
        assert reused.json()["error"]["code"] == "turn_id_reused"
    retry = chat(replica.url, "s1", "my name is Ada", turn_id="t1")  # a real retry is still answered
    assert retry.status_code == 200 and retry.json()["reply"] == first.json()["reply"]
    assert admin.xlen(KEYS.session(TENANT, "s1").log) == 2
    record("turn_id_reused", status=409, stored_messages=2)


def test_swagger_ui_is_off_by_default_and_the_openapi_document_is_served(
    redis_server: RedisServer, make_service: MakeService
) -> None:
    replica = make_service(redis_server.url).start()
    assert httpx.get(replica.url + "/docs").status_code == 404  # it would load scripts from a CDN
    assert httpx.get(replica.url + "/openapi.json").json()["info"]["title"] == "Engram"


def test_oversized_request_headers_get_431_from_the_service_and_400_from_haproxy(make_stack: MakeStack) -> None:
    stack = make_stack(replicas=1)
    big = {"X-Padding": "x" * 20_000}
    direct = httpx.get(stack.replicas[0].url + "/healthz", headers=big)
    assert direct.status_code == 431 and direct.json()["error"]["code"] == "headers_too_large"
    assert httpx.get(stack.url + "/healthz", headers=big).status_code == 400  # HAProxy's 16 KiB buffer


def test_haproxy_drops_a_request_whose_headers_never_finish(make_stack: MakeStack) -> None:
    stack = make_stack(replicas=1)
    with socket.create_connection(("127.0.0.1", stack.lb.port), timeout=30) as slow:
        slow.sendall(b"POST /v1/chat HTTP/1.1\r\nHost: x\r\n")  # ...and nothing more (slowloris)
        started = time.monotonic()
        answer = slow.recv(4096)
        waited = time.monotonic() - started
    assert answer.startswith(b"HTTP/1.1 408"), answer[:80]
    assert waited < 25  # `timeout http-request 10s`, not the 120 s client timeout
    record("slow_request_headers", status=408, seconds=round(waited, 1))
