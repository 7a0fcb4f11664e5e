"""Bad input through the HTTP API of a real service process (auth disabled, echo model).

- schemathesis generates requests from the service's own ``/openapi.json`` (valid ones, then ones that
  break the schema), a bounded number per operation with a fixed seed: no 5xx, and every response
  conforms to the schema (status, content type, body).
- hypothesis sends session ids and messages with any Unicode: emoji, NUL and other control characters,
  lone surrogates, very long texts. Each is stored and returned byte-exact (checked through the API and
  in Redis), or refused with a 4xx whose JSON error says why.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import redis
import schemathesis
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode
from schemathesis.specs.openapi.checks import positive_data_acceptance

from engram.redis_keys import SESSION_ID_PATTERN
from testkit.redis_server import RedisServer
from tests.reliability.support import KEYS, TENANT, record
from tests.server.support import ServiceProcess, service_env

pytestmark = pytest.mark.filterwarnings("ignore:Generating overly large repr:hypothesis.errors.HypothesisWarning")

MAX_MESSAGE_BYTES = 32 * 1024
CASES_PER_OPERATION = 50
SEED = 20261121
tried: dict[str, int] = {"schemathesis": 0, "session_ids": 0, "messages": 0}
outcomes: dict[str, int] = {}


@pytest.fixture(scope="module")
def api(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[ServiceProcess, RedisServer]]:
    root: Path = tmp_path_factory.mktemp("bad-input")
    server = RedisServer(root / "redis").start()
    # a token limit above the byte limit: a message the byte limit accepts is never over the token limit
    env = service_env(server.url, ENGRAM_TOKEN_LIMIT="40000")
    process = ServiceProcess(env, root / "service.log").start()
    yield process, server
    process.stop()
    server.stop()
    record(
        "bad_input",
        schemathesis_cases=tried["schemathesis"],
        session_ids=tried["session_ids"],
        messages=tried["messages"],
        statuses=dict(sorted(outcomes.items())),
        server_errors=sum(v for k, v in outcomes.items() if k.startswith("5")),
    )


def count(status: int) -> None:
    outcomes[str(status)] = outcomes.get(str(status), 0) + 1


QUICK = settings(
    max_examples=CASES_PER_OPERATION,
    derandomize=True,
    database=None,
    deadline=None,
    suppress_health_check=list(HealthCheck),
)


@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE], ids=["valid", "invalid"])
def test_schemathesis_requests_from_the_openapi_get_no_5xx_and_schema_conformant_answers(
    api: tuple[ServiceProcess, RedisServer], mode: GenerationMode
) -> None:
    service, _ = api
    schema = schemathesis.openapi.from_url(service.url + "/openapi.json")
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) >= 6
    for operation in operations:

        @QUICK
        @given(case=operation.as_strategy(generation_mode=mode))
        def check(case: schemathesis.Case) -> None:
            tried["schemathesis"] += 1
            response = case.call(base_url=service.url, timeout=10)
            count(response.status_code)
            assert response.status_code < 500, f"{case.method} {case.path}: {response.status_code} {response.text}"
            # cursors are opaque: a made-up one is refused (422 invalid_cursor) although any string fits the schema
            opaque = response.status_code == 422 and "cursor" in (case.query or {})
            case.validate_response(response, excluded_checks=[positive_data_acceptance] if opaque else [])

        try:
            check()
        except Unsatisfiable:
            # an operation without body whose parameters take any string (GET /healthz, GET /v1/models/{model})
            # has no invalid request to make
            assert mode == GenerationMode.NEGATIVE and not operation.body
            for parameter in operation.path_parameters:
                assert set(parameter.definition["schema"]) <= {"type", "title"}, parameter.definition


def assert_refused_with_reason(response: httpx.Response, *codes: str) -> dict[str, str]:
    assert 400 <= response.status_code < 500, response.text
    assert response.headers["content-type"].startswith("application/json")
    error: dict[str, str] = response.json()["error"]
    assert error["code"] in codes, error
    assert error["message"], "a refusal must say why"
    return error


def post_turn(url: str, session_id: str, message: str, turn_id: str) -> httpx.Response:
    # ensure_ascii: lone surrogates travel as \\udXXX escapes, as a JSON client would send them
    body = json.dumps({"session_id": session_id, "message": message, "turn_id": turn_id}, ensure_ascii=True)
    response = httpx.post(url + "/v1/chat", content=body, headers={"content-type": "application/json"}, timeout=15)
    count(response.status_code)
    return response


def stored_user_message(server: RedisServer, session_id: str, turn_id: str) -> bytes:
    """The user message of ``turn_id`` as Redis holds it (raw bytes)."""
    with redis.Redis(port=server.port) as client:
        entries = client.xrevrange(KEYS.session(TENANT, session_id).log, count=2)
    assert len(entries) == 2
    _, reply = entries[0]
    _, user = entries[1]
    assert user[b"role"] == b"user" and reply[b"role"] == b"assistant"
    assert user[b"turn"] == reply[b"turn"] == turn_id.encode()
    content: bytes = user[b"content"]
    return content


unicode_text = st.text(alphabet=st.characters(codec="utf-8"), max_size=300)
with_surrogate = st.builds(lambda a, b: a + "\ud800" + b, st.text(max_size=20), st.text(max_size=20))
long_text = st.builds(lambda piece, times: piece * times, st.text(min_size=1, max_size=6), st.integers(500, 9000))
messages = st.one_of(unicode_text, with_surrogate, long_text)


@settings(max_examples=120, derandomize=True, database=None, deadline=None, suppress_health_check=list(HealthCheck))
@given(message=messages)
@example(message="\x00")
@example(message="nul \x00 in the middle, bell \x07, escape \x1b[31mred\x1b[0m, del \x7f")
@example(message="👩‍👩‍👧‍👦 family, 🇫🇷 flag, e\u0301 combining, \u202eRTL override, \ufeffBOM, \u200bzero-width")
@example(message="\r\n\t line breaks \u2028 and \u2029")
@example(message="é" * (MAX_MESSAGE_BYTES // 2))  # exactly at the limit, 2-byte characters
@example(message="😀" * (MAX_MESSAGE_BYTES // 4) + "x")  # one byte over
@example(message=" \t\n ")  # blank
@example(message="")
def test_any_message_is_stored_and_returned_byte_exact_or_refused_with_a_reason(
    api: tuple[ServiceProcess, RedisServer], message: str
) -> None:
    service, server = api
    tried["messages"] += 1
    session_id, turn_id = "unicode-messages", f"m{tried['messages']}"
    response = post_turn(service.url, session_id, message, turn_id)
    try:
        raw = message.encode("utf-8")
    except UnicodeEncodeError:
        assert_refused_with_reason(response, "invalid_message", "invalid_request")
        return
    if not message.strip():
        assert_refused_with_reason(response, "invalid_message")
        return
    if len(raw) > MAX_MESSAGE_BYTES:
        assert response.status_code == 413
        # over the message limit, or (JSON-escaped, up to 6 bytes a character) over the request body limit
        assert "bytes" in assert_refused_with_reason(response, "message_too_large", "request_too_large")["message"]
        return
    assert response.status_code == 200, response.text
    assert stored_user_message(server, session_id, turn_id) == raw
    page = httpx.get(f"{service.url}/v1/sessions/{session_id}/messages", params={"limit": 1000}, timeout=10).json()
    returned = [m for m in page["messages"] if m["turn_id"] == turn_id and m["role"] == "user"]
    assert [m["content"] for m in returned] == [message]
    if len(raw) < MAX_MESSAGE_BYTES - 200:  # the next turn's echo quotes it verbatim: the model was given it exactly
        assert f'"{message}"' in post_turn(service.url, session_id, "and before?", f"{turn_id}-q").json()["reply"]


@settings(max_examples=80, derandomize=True, database=None, deadline=None, suppress_health_check=list(HealthCheck))
@given(session_id=st.one_of(st.from_regex(SESSION_ID_PATTERN, fullmatch=True), st.text(max_size=140)))
@example(session_id="a" * 128)
@example(session_id="a" * 129)
@example(session_id="x{y}")
@example(session_id="x:y")
@example(session_id="x*")
@example(session_id="../etc")
@example(session_id="\x00")
@example(session_id="ок")
def test_any_session_id_is_served_exactly_or_refused_with_a_reason(
    api: tuple[ServiceProcess, RedisServer], session_id: str
) -> None:
    service, server = api
    tried["session_ids"] += 1
    turn_id = f"s{tried['session_ids']}"
    response = post_turn(service.url, session_id, "hello", turn_id)
    if not SESSION_ID_PATTERN.fullmatch(session_id):
        assert_refused_with_reason(response, "invalid_session_id")
        return
    assert response.status_code == 200, response.text
    assert response.json()["session_id"] == session_id
    assert stored_user_message(server, session_id, turn_id) == b"hello"
    listed = httpx.get(f"{service.url}/v1/sessions/{session_id}/messages", params={"limit": 1000}, timeout=10)
    assert listed.status_code == 200
    assert any(m["turn_id"] == turn_id for m in listed.json()["messages"])


@pytest.mark.parametrize("body", [b"\xff\xfe not utf-8", b'{"session_id": "s", "message": "\xe9"}', b"\x00"])
def test_a_body_that_is_not_utf8_json_is_422_invalid_request(
    api: tuple[ServiceProcess, RedisServer], body: bytes
) -> None:
    """Found by schemathesis: FastAPI answered 400 "There was an error parsing the body", a status the
    contract does not have."""
    service, _ = api
    response = httpx.post(service.url + "/v1/chat", content=body, headers={"content-type": "application/json"})
    count(response.status_code)
    assert response.status_code == 422
    assert_refused_with_reason(response, "invalid_request")
