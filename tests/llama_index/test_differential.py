"""Engram's LlamaIndex adapters against LlamaIndex's own reference classes, operation by operation.

Hypothesis draws a sequence of operations; each runs on the reference and on Engram's adapter (a real
redis-server), and what a user sees (return values, raised exception types, every key's messages, the
key list) must be equal after every step:

- ``SimpleChatStore`` vs ``RedisChatStore`` (sync and async twins);
- ``ChatMemoryBuffer`` over ``SimpleChatStore`` vs ``EngramMemory``;
- ``Memory`` over its default SQL store (SQLite) vs ``Memory`` over ``EngramDBChatStore``.

Keys include the ones Engram's session ids cannot hold as they are (``"user:42"``, e-mails, spaces,
non-ASCII, 200+ characters, keys that look like Engram's encoded ids). Deliberate differences, kept
out of the comparison here and documented in the adapters' docstrings and docs/design.md:

- a key with no messages left is no key (Redis keeps no empty session): the reference's empty lists are
  dropped after each step, as LlamaIndex's own Redis store would never have them;
- ``get_keys`` order is session-id order, not first-use order: compared as sets;
- ``EngramMemory`` holds a user message until its answer instead of writing it at once: invisible to
  one memory's user (compared here), visible only to a second memory on the session (not compared);
- Engram refuses an empty user message (InvalidMessage): contents here are never empty.
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from llama_index.core.base.llms.types import ChatMessage
from llama_index.core.memory import ChatMemoryBuffer, Memory
from llama_index.core.storage.chat_store import SimpleChatStore

from engram.llama_index import EngramDBChatStore, EngramMemory, RedisChatStore
from testkit.redis_server import RedisServer

ODD_KEYS = [
    "s1",
    "user:42",
    "alice@example.com",
    "chat history",
    "héllo wörld 日本語",
    "x" * 200,
    "k__dXNlcjo0Mg",  # what "user:42" encodes to: must stay a different key
    "h__abc",
    "-leading-dash",
]
keys = st.one_of(
    st.sampled_from(ODD_KEYS),
    st.text(st.characters(blacklist_categories=("Cs",)), min_size=1, max_size=140),
)
words = st.lists(st.sampled_from(["tea", "cake", "why", "yes", "no", "ok", "hello there"]), min_size=1, max_size=4)
messages = st.builds(
    lambda role, content: ChatMessage(role=role, content=" ".join(content)),
    st.sampled_from(["user", "user", "assistant", "assistant", "tool", "system"]),
    words,
)
indexes = st.one_of(st.none(), st.integers(-6, 6))
DIFFERENTIAL = settings(
    max_examples=40,
    derandomize=True,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
_tenants = itertools.count()


def seen(value: Any) -> Any:
    """What a user sees of a result: messages as (role, content), lists element-wise."""
    if isinstance(value, ChatMessage):
        return (value.role.value, value.content)
    if isinstance(value, list):
        return [seen(v) for v in value]
    return value


def outcome(call: Any) -> Any:
    try:
        return ("ok", seen(call()))
    except Exception as error:  # the type is what is compared
        return ("raised", type(error).__name__)


@pytest.fixture(scope="module")
def shared_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    server = RedisServer(Path(tmp_path_factory.mktemp("redis"))).start()
    yield server.url
    server.stop()


@pytest.fixture(scope="module")
def loop() -> Iterator[asyncio.AbstractEventLoop]:
    """One loop for the async twins (each loop gets its own connection pool)."""
    running = asyncio.new_event_loop()
    yield running
    running.close()


def fresh_tenant() -> str:
    """Every example writes to its own tenant: no flushing between examples."""
    return f"t{next(_tenants)}"


# --- SimpleChatStore vs RedisChatStore -----------------------------------------------------------------
store_ops = st.one_of(
    st.tuples(st.just("set"), st.lists(messages, max_size=4)),
    st.tuples(st.just("add"), messages, indexes),
    st.tuples(st.just("get")),
    st.tuples(st.just("delete_message"), st.integers(-6, 6)),
    st.tuples(st.just("delete_last")),
    st.tuples(st.just("delete_messages")),
    st.tuples(st.just("get_keys")),
)


def run_store_op(store: Any, key: str, op: tuple[Any, ...], use_async: bool, loop: asyncio.AbstractEventLoop) -> Any:
    name, *args = op

    def run(sync: str, asynchronous: str, *call_args: Any) -> Any:
        if use_async:
            return outcome(lambda: loop.run_until_complete(getattr(store, asynchronous)(*call_args)))
        return outcome(lambda: getattr(store, sync)(*call_args))

    if name == "set":
        return run("set_messages", "aset_messages", key, list(args[0]))
    if name == "add":
        message, idx = args
        if idx is None:
            return run("add_message", "async_add_message", key, message)
        return run("add_message", "async_add_message", key, message, idx)
    if name == "get":
        return run("get_messages", "aget_messages", key)
    if name == "delete_message":
        return run("delete_message", "adelete_message", key, args[0])
    if name == "delete_last":
        return run("delete_last_message", "adelete_last_message", key)
    if name == "delete_messages":
        return run("delete_messages", "adelete_messages", key)
    return ("ok", sorted(run("get_keys", "aget_keys")[1]))


@DIFFERENTIAL
@given(
    key_pool=st.lists(keys, min_size=1, max_size=3, unique=True),
    steps=st.lists(st.tuples(st.integers(0, 2), store_ops, st.booleans()), min_size=6, max_size=25),
)
@example(  # list.insert and list.pop edges: clamped inserts, a negative index before the start
    key_pool=["user:42", "x" * 200],
    steps=[
        (0, ("set", [ChatMessage(role="user", content="a"), ChatMessage(role="assistant", content="b")]), False),
        (0, ("add", ChatMessage(role="user", content="c"), 1), True),
        (0, ("add", ChatMessage(role="user", content="d"), -9), False),
        (1, ("add", ChatMessage(role="user", content="e"), 5), True),
        (0, ("delete_message", -6), False),
        (0, ("delete_message", 5), True),
        (0, ("delete_message", -2), False),
        (1, ("delete_last",), False),
        (1, ("delete_last",), True),
        (0, ("get_keys",), False),
    ],
)
def test_redis_chat_store_behaves_as_simple_chat_store(
    shared_redis: str, loop: asyncio.AbstractEventLoop, key_pool: list[str], steps: list[Any]
) -> None:
    reference = SimpleChatStore()
    engram = RedisChatStore.from_url(shared_redis, tenant=fresh_tenant())
    for n, (which, op, use_async) in enumerate(steps):
        key = key_pool[which % len(key_pool)]
        expected = run_store_op(reference, key, op, use_async=False, loop=loop)
        got = run_store_op(engram, key, op, use_async, loop)
        assert got == expected, f"step {n}: {op} on {key!r}"
        for empty in [k for k, v in reference.store.items() if not v]:
            del reference.store[empty]  # deliberate: a key without messages is no key (module docstring)
        for each in key_pool:
            assert seen(engram.get_messages(each)) == seen(reference.get_messages(each)), f"step {n}: {each!r}"
        assert sorted(engram.get_keys()) == sorted(reference.get_keys()), f"step {n}"


# --- ChatMemoryBuffer vs EngramMemory -----------------------------------------------------------------
memory_ops = st.one_of(
    st.tuples(st.just("put"), messages),
    st.tuples(st.just("put"), messages),
    st.tuples(st.just("get"), st.integers(0, 3)),
    st.tuples(st.just("get_all")),
    st.tuples(st.just("set"), st.lists(messages, max_size=5)),
    st.tuples(st.just("reset")),
)


def run_memory_op(memory: Any, op: tuple[Any, ...]) -> Any:
    name, *args = op
    if name == "put":
        return outcome(lambda: memory.put(args[0]))
    if name == "get":
        return outcome(lambda: memory.get(initial_token_count=args[0]))
    if name == "get_all":
        return outcome(memory.get_all)
    if name == "set":
        return outcome(lambda: memory.set(list(args[0])))
    return outcome(memory.reset)


def whitespace_tokens(text: str) -> list[str]:
    """A tokenizer for which ChatMemoryBuffer's joined count equals the sum of per-message counts."""
    return text.split()


@DIFFERENTIAL
@given(
    key=keys,
    token_limit=st.integers(1, 12),
    history=st.lists(messages, max_size=4),
    steps=st.lists(memory_ops, min_size=4, max_size=20),
)
@example(  # the whole history may open with an answer; an over-budget held message comes back alone
    key="chat history",
    token_limit=3,
    history=[ChatMessage(role="assistant", content="hi there"), ChatMessage(role="user", content="yo")],
    steps=[
        ("get", 0),
        ("get", 1),
        ("put", ChatMessage(role="user", content="one two three four")),
        ("get", 0),
        ("put", ChatMessage(role="assistant", content="ok")),
        ("get", 0),
        ("put", ChatMessage(role="assistant", content="hello there yes no")),
        ("get", 0),
    ],
)
def test_engram_memory_behaves_as_chat_memory_buffer(
    shared_redis: str, key: str, token_limit: int, history: list[ChatMessage], steps: list[Any]
) -> None:
    common: dict[str, Any] = {
        "chat_history": list(history),
        "chat_store_key": key,
        "token_limit": token_limit,
        "tokenizer_fn": whitespace_tokens,
    }
    reference = ChatMemoryBuffer.from_defaults(**common)
    engram = EngramMemory.from_defaults(redis_url=shared_redis, tenant=fresh_tenant(), **common)
    assert seen(engram.get_all()) == seen(reference.get_all())
    for n, op in enumerate(steps):
        assert run_memory_op(engram, op) == run_memory_op(reference, op), f"step {n}: {op}"
        assert seen(engram.get_all()) == seen(reference.get_all()), f"step {n}"


# --- Memory over SQLite vs Memory over EngramDBChatStore ------------------------------------------------
memory_class_ops = st.one_of(
    st.tuples(st.just("put"), messages),
    st.tuples(st.just("put"), messages),
    st.tuples(st.just("get")),
    st.tuples(st.just("get_all")),
)


async def run_memory_class_op(memory: Memory, op: tuple[Any, ...]) -> Any:
    name, *args = op
    try:
        if name == "put":
            return ("ok", seen(await memory.aput(args[0])))
        if name == "get":
            return ("ok", seen(await memory.aget()))
        return ("ok", seen(await memory.aget_all()))
    except Exception as error:  # the type is what is compared
        return ("raised", type(error).__name__)


@DIFFERENTIAL
@given(
    key=keys,
    token_limit=st.integers(8, 30),
    steps=st.lists(memory_class_ops, min_size=6, max_size=20),
)
def test_memory_over_engram_behaves_as_memory_over_sqlite(
    shared_redis: str, loop: asyncio.AbstractEventLoop, key: str, token_limit: int, steps: list[Any]
) -> None:
    def memory(**store: Any) -> Memory:
        return Memory.from_defaults(
            session_id=key,
            token_limit=token_limit,
            token_flush_size=max(1, token_limit // 4),
            chat_history_token_ratio=0.5,  # small enough that a few messages archive the oldest
            tokenizer_fn=whitespace_tokens,
            **store,
        )

    reference = memory()
    engram = memory(chat_store=EngramDBChatStore.from_url(shared_redis, tenant=fresh_tenant()))

    async def run() -> None:
        for n, op in enumerate(steps):
            assert await run_memory_class_op(engram, op) == await run_memory_class_op(reference, op), f"step {n}: {op}"
        archived = await engram.sql_store.count_messages(key, status=None)
        assert archived == await reference.sql_store.count_messages(key, status=None)

    loop.run_until_complete(run())
