"""The adapters as LlamaIndex users hold them: any key, ChatMemoryBuffer's arguments, serialization."""

from __future__ import annotations

import pickle
from pathlib import Path

import pytest
import redis
from hypothesis import given
from hypothesis import strategies as st
from llama_index.core.base.llms.types import ChatMessage
from llama_index.core.memory import Memory
from llama_index.core.storage.chat_store import SimpleChatStore

from engram.errors import StoreUnavailable
from engram.llama_index import EngramDBChatStore, EngramMemory, RedisChatStore
from engram.llama_index.keys import HASHED_PREFIX, key_for, label_for, session_id_for
from engram.redis_keys import SESSION_ID_PATTERN
from testkit.redis_server import RedisServer

any_key = st.text(st.characters(blacklist_categories=("Cs",)), min_size=1, max_size=300)


@given(first=any_key, second=any_key)
def test_keys_map_onto_valid_session_ids_reversibly_and_without_collisions(first: str, second: str) -> None:
    session = session_id_for(first)
    assert SESSION_ID_PATTERN.fullmatch(session)
    assert key_for(session, label_for(first) or None) == first
    assert (session_id_for(second) == session) == (first == second)


def test_odd_keys_work_in_every_adapter_and_get_keys_returns_them(redis_url: str) -> None:
    odd = ["user:42", "alice@example.com", "chat history", "日本語のキー", "x" * 250, "k__dXNlcjo0Mg", "s1"]
    store = RedisChatStore.from_url(redis_url)
    for n, key in enumerate(odd):
        store.add_message(key, ChatMessage(role="user", content=f"m{n}"))
    assert sorted(store.get_keys()) == sorted(odd)
    assert [m.content for m in store.get_messages("x" * 250)] == ["m4"]
    assert session_id_for("x" * 250).startswith(HASHED_PREFIX)


async def test_memory_takes_any_session_id(redis_url: str) -> None:
    db = EngramDBChatStore.from_url(redis_url, tenant="other")
    memory = Memory.from_defaults(session_id="alice@example.com", chat_store=db)
    await memory.aput(ChatMessage(role="user", content="hello"))
    assert await db.get_keys() == ["alice@example.com"]
    copy = pickle.loads(pickle.dumps(db))
    assert [m.content for m in await copy.get_messages("alice@example.com")] == ["hello"]


def test_from_defaults_stores_chat_history_and_refuses_what_it_cannot_honour(redis_url: str) -> None:
    history = [ChatMessage(role="user", content="hi"), ChatMessage(role="assistant", content="hello")]
    memory = EngramMemory.from_defaults(chat_history=history, redis_url=redis_url, chat_store_key="user:7")
    other = EngramMemory.from_defaults(chat_store=RedisChatStore.from_url(redis_url), chat_store_key="user:7")
    assert [m.content for m in other.get_all()] == ["hi", "hello"] and memory.chat_store_key == "user:7"
    with pytest.raises(TypeError, match="chat_store"):
        EngramMemory.from_defaults(chat_store=SimpleChatStore(), redis_url=redis_url)
    with pytest.raises(TypeError, match="summarize_prompt"):
        EngramMemory.from_defaults(redis_url=redis_url, summarize_prompt="no")
    with pytest.raises(TypeError, match="redis_url"):
        EngramMemory.from_defaults(chat_store_key="k")


def test_a_held_message_over_the_budget_comes_back_alone_instead_of_raising(redis_url: str) -> None:
    memory = EngramMemory.from_defaults(redis_url=redis_url, token_limit=5, tokenizer_fn=str.split)
    memory.put(ChatMessage(role="user", content="one two three four five six"))
    assert [m.content for m in memory.get()] == ["one two three four five six"]
    assert RedisChatStore.from_url(redis_url).get_keys() == []  # held, not stored, until the answer


def test_adapters_serialize_and_unpickle_into_working_objects(redis_url: str) -> None:
    store = RedisChatStore.from_url(redis_url, tenant="acme", ttl=60)
    store.set_messages("a b", [ChatMessage(role="user", content="kept")])
    for copy in (
        pickle.loads(pickle.dumps(store)),
        RedisChatStore.from_dict(store.to_dict()),
        RedisChatStore.model_validate(store.model_dump()),
    ):
        assert copy.ttl == 60 and [m.content for m in copy.get_messages("a b")] == ["kept"]

    memory = EngramMemory.from_defaults(redis_url=redis_url, tenant="acme", chat_store_key="a b", token_limit=50)
    memory.put(ChatMessage(role="user", content="held"))
    for restored in (
        pickle.loads(pickle.dumps(memory)),
        EngramMemory.from_string(memory.to_string()),
        EngramMemory.from_dict(memory.to_dict()),
        EngramMemory.model_validate(memory.model_dump()),
    ):
        assert restored.token_limit == 50 and restored.get_all()[0].content == "kept"
    assert [m.content for m in pickle.loads(pickle.dumps(memory)).get()] == ["kept", "held"]


def test_a_memory_made_from_a_chat_store_writes_with_the_stores_retention(redis_url: str) -> None:
    store = RedisChatStore.from_url(redis_url, ttl=0, max_messages=4)
    memory = EngramMemory.from_defaults(chat_store=store, chat_store_key="kept")
    for n in range(3):
        memory.put(ChatMessage(role="user", content=f"q{n}"))
        memory.put(ChatMessage(role="assistant", content=f"a{n}"))
    assert [m.content for m in store.get_messages("kept")] == ["q1", "a1", "q2", "a2"]  # trimmed at 4
    client = redis.Redis.from_url(redis_url)
    log = next(k for k in client.scan_iter("engram:default:*:log"))
    assert client.ttl(log) == -1  # ttl=0: kept for good, not the default week
    copy = EngramMemory.from_dict(memory.to_dict())
    assert (copy.session_ttl_seconds, copy.max_messages_per_session) == (0, 4)


def test_a_commit_that_fails_keeps_the_turn_held_and_its_retry_stores_it_once(tmp_path: Path) -> None:
    server = RedisServer(tmp_path / "redis").start()
    try:
        memory = EngramMemory(redis_url=server.url, session_id="user:7")
        memory.put(ChatMessage(role="user", content="my name is Ada"))
        server.stop()
        with pytest.raises(StoreUnavailable):
            memory.put(ChatMessage(role="assistant", content="hello Ada"))
        server.start()
        memory.put(ChatMessage(role="assistant", content="hello Ada"))  # the same turn, retried
        memory.put(ChatMessage(role="assistant", content="hello Ada"))  # a second answer alone: a new turn
        assert [m.content for m in memory.get_all()] == ["my name is Ada", "hello Ada", "hello Ada"]
    finally:
        server.stop()
