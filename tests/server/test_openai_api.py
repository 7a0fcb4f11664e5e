"""OpenAI's chat-completions API with Engram's memory behind it, driven by real clients: the official
``openai`` SDK (sync, async, streaming) and LlamaIndex's ``OpenAILike``, against ``make run``'s stack
(2 replicas behind HAProxy round-robin, auth on: the demo tenant's API key is the OpenAI API key)."""

from __future__ import annotations

import re
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest
from llama_index.core.llms import ChatMessage
from llama_index.llms.openai_like import OpenAILike  # type: ignore[import-untyped]

from testkit.local_stack import LocalStack, stack_env
from testkit.redis_server import RedisServer, quiet_ports
from tests.reliability.fake_model import FakeModel
from tests.server.support import ServiceProcess, service_env


class Stack:
    def __init__(self, url: str, key: str) -> None:
        self.url, self.key = url, key

    def client(self, session: str | None = None, **kwargs: object) -> openai.OpenAI:
        headers = {"X-Engram-Session": session} if session else None
        return openai.OpenAI(base_url=self.url + "/v1", api_key=self.key, default_headers=headers, **kwargs)  # type: ignore[arg-type]

    def messages(self, session: str) -> list[dict[str, str]]:
        response = httpx.get(
            f"{self.url}/v1/sessions/{session}/messages?limit=1000", headers={"Authorization": f"Bearer {self.key}"}
        )
        if response.status_code == 404:
            return []
        assert response.status_code == 200, response.text
        return response.json()["messages"]  # type: ignore[no-any-return]


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    root: Path = tmp_path_factory.mktemp("openai-stack")
    ports = quiet_ports(4)
    with LocalStack(stack_env(root / "run", ports, replicas=2), log=root / "run-local.out") as local:
        key = (root / "run" / "demo-api-key").read_text().strip()
        yield Stack(f"http://127.0.0.1:{ports[0]}", key)
    assert local.leftovers == []


def new_session() -> str:
    return f"oai-{uuid.uuid4().hex[:10]}"


def user(text: str) -> dict[str, str]:
    return {"role": "user", "content": text}


def test_the_official_sdk_lists_the_served_model(stack: Stack) -> None:
    models = stack.client().models.list()
    assert [m.id for m in models.data] == ["echo"]
    assert stack.client().models.retrieve("echo").owned_by == "engram"


def test_ten_turns_over_alternating_replicas_keep_the_whole_conversation(stack: Stack) -> None:
    session = new_session()
    client = stack.client(session)
    served_by, redis_nodes, replies = set(), set(), []
    for n in range(1, 11):
        raw = client.chat.completions.with_raw_response.create(model="echo", messages=[user(f"fact number {n}")])
        served_by.add(raw.headers["x-served-by"])
        redis_nodes.add(raw.headers["x-engram-redis-node"])  # the Redis that holds the session
        assert raw.headers["x-engram-session"] == session
        completion = raw.parse()
        assert completion.object == "chat.completion" and completion.choices[0].finish_reason == "stop"
        replies.append(completion.choices[0].message.content)
    assert len(served_by) == 2, "HAProxy must spread the turns over both replicas"
    assert len(redis_nodes) == 1 and re.fullmatch(r"127\.0\.0\.1:\d+", redis_nodes.pop())
    # The client sent one message per call; turn 10's model was given turns 1 to 9 (18 messages).
    assert replies[9] == 'You said before: "fact number 9". I was given 18 earlier messages.'
    stored = stack.messages(session)
    assert [m["content"] for m in stored[::2]] == [f"fact number {n}" for n in range(1, 11)]
    assert [m["content"] for m in stored[1::2]] == replies


async def test_the_async_sdk_streams_chunks_that_end_the_turn_and_report_usage(stack: Stack) -> None:
    session = new_session()
    client = openai.AsyncOpenAI(
        base_url=stack.url + "/v1", api_key=stack.key, default_headers={"X-Engram-Session": session}
    )
    await client.chat.completions.create(model="echo", messages=[user("my name is Ada")])
    stream = await client.chat.completions.create(
        model="echo", messages=[user("what is my name?")], stream=True, stream_options={"include_usage": True}
    )
    pieces, finish, usage, ids = [], None, None, set()
    async for chunk in stream:
        ids.add(chunk.id)
        assert chunk.object == "chat.completion.chunk"
        if chunk.choices:
            pieces.append(chunk.choices[0].delta.content or "")
            finish = chunk.choices[0].finish_reason or finish
        else:
            usage = chunk.usage
    await client.close()
    reply = "".join(pieces)
    assert reply == 'You said before: "my name is Ada". I was given 2 earlier messages.'
    assert finish == "stop" and len(ids) == 1
    assert usage is not None and usage.completion_tokens > 0 and usage.prompt_tokens > usage.completion_tokens
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens
    assert [m["content"] for m in stack.messages(session)][-2:] == ["what is my name?", reply]


def test_the_raw_stream_is_server_sent_events_ending_with_done(stack: Stack) -> None:
    body = {"model": "echo", "messages": [user("hello")], "stream": True}
    headers = {"Authorization": f"Bearer {stack.key}", "X-Engram-Session": new_session()}
    with httpx.stream("POST", stack.url + "/v1/chat/completions", json=body, headers=headers, timeout=15) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        events = [line for line in response.iter_lines() if line]
    assert all(line.startswith("data: ") for line in events)
    assert events[-1] == "data: [DONE]"


def test_a_retry_with_the_same_idempotency_key_is_answered_once_and_stored_once(stack: Stack) -> None:
    session = new_session()
    client = stack.client(session)
    key = {"Idempotency-Key": f"turn-{uuid.uuid4().hex}"}
    first = client.chat.completions.create(model="echo", messages=[user("only once")], extra_headers=key)
    again = client.chat.completions.create(model="echo", messages=[user("only once")], extra_headers=key)
    assert again.id == first.id and again.choices[0].message.content == first.choices[0].message.content
    assert [m["content"] for m in stack.messages(session)] == ["only once", first.choices[0].message.content]
    with pytest.raises(openai.ConflictError) as reused:  # the same key for another message
        client.chat.completions.create(model="echo", messages=[user("something else")], extra_headers=key)
    assert reused.value.code == "turn_id_reused"


def test_a_client_that_sends_its_whole_history_never_stores_a_message_twice(stack: Stack) -> None:
    session = new_session()
    client = stack.client(session)
    history: list[dict[str, str]] = [{"role": "system", "content": "be brief"}]
    for text in ("one", "two", "three"):
        history.append(user(text))
        answer = client.chat.completions.create(model="echo", messages=history).choices[0].message.content
        history.append({"role": "assistant", "content": answer or ""})
    stored = stack.messages(session)
    assert [m["content"] for m in stored] == [m["content"] for m in history[1:]]  # system never stored


def test_the_session_can_be_named_in_metadata_instead_of_the_header(stack: Stack) -> None:
    session = new_session()
    client = stack.client()
    client.chat.completions.create(model="echo", messages=[user("via metadata")], metadata={"session_id": session})
    assert [m["content"] for m in stack.messages(session)][:1] == ["via metadata"]


def test_without_a_session_the_conversation_sent_is_answered_and_nothing_is_stored(stack: Stack) -> None:
    client = stack.client()
    before = httpx.get(f"{stack.url}/v1/sessions?limit=1000", headers={"Authorization": f"Bearer {stack.key}"}).json()
    messages = [user("first"), {"role": "assistant", "content": "ok"}, user("second")]
    raw = client.chat.completions.with_raw_response.create(model="echo", messages=messages)
    assert raw.parse().choices[0].message.content == 'You said before: "first". I was given 2 earlier messages.'
    assert raw.headers["x-engram-cache"] == "off" and "x-engram-session" not in raw.headers
    assert "x-engram-redis-node" not in raw.headers
    after = httpx.get(f"{stack.url}/v1/sessions?limit=1000", headers={"Authorization": f"Bearer {stack.key}"}).json()
    assert after == before


def test_llamaindex_openai_like_gets_memory_from_the_session(stack: Stack) -> None:
    session = new_session()
    llm = OpenAILike(
        model="echo",
        api_base=stack.url + "/v1",
        api_key=stack.key,
        is_chat_model=True,
        default_headers={"X-Engram-Session": session},
    )
    llm.chat([ChatMessage(role="user", content="the password is swordfish")])
    answer = llm.chat([ChatMessage(role="user", content="what is the password?")])
    assert answer.message.content == 'You said before: "the password is swordfish". I was given 2 earlier messages.'
    streamed = "".join(r.delta or "" for r in llm.stream_chat([ChatMessage(role="user", content="and now?")]))
    assert streamed == 'You said before: "what is the password?". I was given 4 earlier messages.'


def test_bad_requests_through_the_sdk_get_openai_shaped_errors_and_store_nothing(stack: Stack) -> None:
    session = new_session()
    client = stack.client(session, max_retries=0)
    with pytest.raises(openai.AuthenticationError) as unauthorized:
        openai.OpenAI(base_url=stack.url + "/v1", api_key="egk_nobody.wrong", max_retries=0).models.list()
    assert unauthorized.value.status_code == 401 and unauthorized.value.type == "authentication_error"
    with pytest.raises(openai.NotFoundError) as unknown:
        client.chat.completions.create(model="gpt-4o", messages=[user("hi")])
    assert (unknown.value.code, unknown.value.param) == ("model_not_found", "model")
    refusals = {
        "no messages": {"messages": []},
        "last message is not the user's": {"messages": [user("q"), {"role": "assistant", "content": "a"}]},
        "empty message": {"messages": [user("   ")]},
        "two choices": {"messages": [user("hi")], "n": 2},
        "image content": {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]},
        "temperature out of range": {"messages": [user("hi")], "temperature": 7},
    }
    for why, body in refusals.items():
        with pytest.raises(openai.BadRequestError) as refused:
            client.chat.completions.create(model="echo", **body)  # type: ignore[call-overload]
        error = refused.value.body
        assert isinstance(error, dict) and error["message"] and error["type"] == "invalid_request_error", why
    with pytest.raises(openai.BadRequestError) as bad_session:
        stack.client("not a valid id!", max_retries=0).chat.completions.create(model="echo", messages=[user("hi")])
    assert "session" in bad_session.value.message
    assert stack.messages(session) == []


def test_sampling_options_and_system_messages_reach_the_upstream_model(tmp_path: Path) -> None:
    server = RedisServer(tmp_path / "redis").start()
    with FakeModel("reply") as model:
        service = ServiceProcess(service_env(server.url, **model.service_env(timeout=10)), tmp_path / "service.log")
        try:
            service.start()
            client = openai.OpenAI(base_url=service.url + "/v1", api_key="unused", max_retries=0)
            headers = {"X-Engram-Session": "upstream"}
            client.chat.completions.create(model="fake", messages=[user("first")], extra_headers=headers)
            reply = client.chat.completions.create(
                model="fake",
                messages=[{"role": "system", "content": "answer in French"}, user("second")],
                temperature=0.25,
                max_completion_tokens=64,
                extra_headers=headers,
            )
            sent = model.last_request
        finally:
            service.stop()
            server.stop()
    assert reply.choices[0].message.content.startswith("fake reply to 'second'")
    assert [m["role"] for m in sent["messages"]] == ["system", "user", "assistant", "user"]
    assert sent["messages"][0]["content"] == "answer in French" and sent["messages"][-1]["content"] == "second"
    assert (sent["temperature"], sent["max_tokens"], sent["stream"]) == (0.25, 64, True)
