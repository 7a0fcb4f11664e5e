"""Model failure and timeout: a 502 and nothing committed. A client that leaves in the middle of a
streamed reply: nothing is committed (no half turn, no orphan user message); a retry with the same
``turn_id`` runs the turn again and stores it once.

Why nothing: the service reads the model's stream in the request's task and commits the pair only when
the stream has ended. When the client goes away the response closes the turn, which closes the model's
stream and its HTTP response: the model stops generating (the fake model never finishes its stream) and
nothing is committed. The turn is counted ``abandoned`` in ``engram_turns_total``.
"""

from __future__ import annotations

import time

import httpx
import redis

from testkit.redis_server import RedisServer
from tests.reliability.fake_model import FakeModel
from tests.reliability.support import KEYS, TENANT, holds_for, poll_until, record, session_log
from tests.server.conftest import MakeService
from tests.server.support import chat, metric, scrape

LLM_TIMEOUT = 1.0


def assert_nothing_stored(client: redis.Redis, session: str) -> None:
    keys = KEYS.session(TENANT, session)
    assert client.xlen(keys.log) == 0
    assert client.hlen(keys.turns) == 0
    assert client.zscore(keys.index, session) is None


def test_model_that_never_answers_gives_502_within_the_timeout_and_commits_nothing(
    redis_server: RedisServer, make_service: MakeService
) -> None:
    with FakeModel("hang") as model:
        replica = make_service(redis_server.url, **model.service_env(LLM_TIMEOUT)).start()
        client = redis.Redis(port=redis_server.port, decode_responses=True)
        timings: list[float] = []
        for stream in (False, True):
            session = f"timeout-{int(stream)}"
            started = time.monotonic()
            response = chat(replica.url, session, "hello?", turn_id=f"{session}.t0", stream=stream)
            timings.append(time.monotonic() - started)
            assert response.status_code == 502, response.text
            assert response.headers["content-type"].startswith("application/json")
            assert response.json()["error"]["code"] == "model_failed"
            assert_nothing_stored(client, session)
        assert model.requests >= 2
        # openai-like is built with max_retries=1: at most two attempts of LLM_TIMEOUT each, plus backoff
        assert max(timings) < 4 * LLM_TIMEOUT + 2, timings
        samples = scrape(replica.url)
        assert metric(samples, "engram_turns_total", outcome="model_error") == 2
        assert metric(samples, "engram_turns_total", outcome="ok") == 0
    record(
        "model_timeout",
        requests=2,
        status=502,
        seconds_to_502_max=round(max(timings), 2),
        llm_timeout=LLM_TIMEOUT,
        model_attempts=model.requests,
        turns_stored=0,
    )


def test_client_leaving_mid_stream_commits_nothing_and_a_retry_stores_the_turn_once(
    redis_server: RedisServer, make_service: MakeService
) -> None:
    pieces, piece_delay = 10, 0.2  # a 2-second reply
    with FakeModel("reply", pieces=pieces, piece_delay=piece_delay) as model:
        replica = make_service(redis_server.url, **model.service_env(10)).start()
        client = redis.Redis(port=redis_server.port, decode_responses=True)
        session, tid = "leaves-mid-stream", "leaves.t0"
        log = KEYS.session(TENANT, session).log
        body = {"session_id": session, "message": "tell me a long story", "turn_id": tid, "stream": True}
        with httpx.stream("POST", replica.url + "/v1/chat", json=body, timeout=10) as response:
            assert response.status_code == 200
            lines = response.iter_lines()
            assert next(line for line in lines if line.startswith("event:")) == "event: token"
        # the connection is closed here, with most of the reply still to come
        poll_until(
            lambda: metric(scrape(replica.url), "engram_turns_total", outcome="abandoned") == 1, 30, "abandoned counted"
        )
        # longer than the rest of the reply would have taken: the turn never appears, not even half of it
        assert holds_for(lambda: client.xlen(log) == 0, pieces * piece_delay + 1.0)
        assert_nothing_stored(client, session)
        # and the model call was cancelled: its stream was cut, not generated (and billed) to the end
        assert model.streams_finished == 0

        # the client retries with the same turn_id: the turn runs again and is stored once
        retry = chat(replica.url, session, "tell me a long story", turn_id=tid)
        assert retry.status_code == 200, retry.text
        entries = session_log(client, session)
        assert [e[1]["role"] for e in entries] == ["user", "assistant"]
        assert {e[1]["turn"] for e in entries} == {tid}
        assert entries[1][1]["content"] == retry.json()["reply"]
        again = chat(replica.url, session, "tell me a long story", turn_id=tid)
        assert again.json()["reply"] == retry.json()["reply"] and client.xlen(log) == 2
        assert model.requests == 2
    record(
        "stream_disconnect",
        pieces=pieces,
        piece_delay=piece_delay,
        stored_after_leaving=0,
        turns_stored_after_retry=1,
        model_requests=model.requests,
    )


def test_client_leaving_before_the_first_token_stops_the_model_and_commits_nothing(
    redis_server: RedisServer, make_service: MakeService
) -> None:
    # The model thinks for a second before its first piece; the client gives up before that, so the
    # response has not started when it leaves.
    with FakeModel("reply", delay=1.0, pieces=10, piece_delay=0.2) as model:
        replica = make_service(redis_server.url, **model.service_env(10)).start()
        client = redis.Redis(port=redis_server.port, decode_responses=True)
        body = {"session_id": "leaves-early", "message": "tell me a long story", "stream": True}
        try:
            httpx.post(replica.url + "/v1/chat", json=body, timeout=0.5)
        except httpx.TimeoutException:
            pass  # the client hangs up here, while the model is still thinking
        poll_until(
            lambda: metric(scrape(replica.url), "engram_turns_total", outcome="abandoned") == 1, 30, "abandoned counted"
        )
        assert holds_for(lambda: client.xlen(KEYS.session(TENANT, "leaves-early").log) == 0, 3.0)
        assert model.requests == 1 and model.streams_finished == 0  # the model's stream was cut
