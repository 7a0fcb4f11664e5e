"""The LlamaIndex adapters against a real redis-server and a real Redis Cluster (``memory_url``), and real chat
engines, across processes."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from llama_index.core.base.llms.types import ChatMessage
from llama_index.core.chat_engine import SimpleChatEngine
from llama_index.core.memory import Memory

from engram.llama_index import EngramDBChatStore, EngramMemory, RedisChatStore, store_from_url
from tests.llama_index.recall_llm import RecallLLM

ROOT = Path(__file__).resolve().parents[2]


def run_app(*args: str) -> str:
    done = subprocess.run(
        [sys.executable, "-m", "tests.llama_index.worker", *args],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout.strip()


def test_a_chat_engine_remembers_across_processes_sync_and_async(memory_url: str) -> None:
    first = run_app("chat-async", memory_url, "s1", "my name is Ada")
    assert "previous user message: None" in first
    second = run_app("chat-sync", memory_url, "s1", "what is my name?")
    assert "given 2 earlier messages; previous user message: 'my name is Ada'" in second
    third = run_app("chat-async", memory_url, "s1", "and again?")
    assert "given 4 earlier messages; previous user message: 'what is my name?'" in third


async def test_memory_commits_the_turn_once_with_two_round_trips_and_nothing_when_the_model_fails(
    memory_url: str,
) -> None:
    store = store_from_url(memory_url)
    failing = EngramMemory(store=store, session_id="s1")
    with pytest.raises(RuntimeError, match="model unavailable"):
        await SimpleChatEngine.from_defaults(llm=RecallLLM(fail=True), memory=failing).achat("lost question")
    assert await store.count_messages("default", "s1") == 0

    memory = EngramMemory(store=store, session_id="s1", turn_id="turn-1")
    window = await memory.aload()
    assert window.outcome == "miss" and window.replay is None
    await SimpleChatEngine.from_defaults(llm=RecallLLM(), memory=memory).achat("hello")
    assert memory.committed is not None and not memory.committed.duplicate
    retry = EngramMemory(store=store, session_id="s1", turn_id="turn-1")
    replay = (await retry.aload()).replay
    assert replay is not None and replay.reply == memory.committed.reply
    assert [m.role for m in await store.all_messages("default", "s1")] == ["user", "assistant"]
    await store.client.aclose()


async def test_memory_window_respects_the_token_limit_and_starts_with_a_user_message(memory_url: str) -> None:
    store = store_from_url(memory_url)
    for n in range(50):
        await store.commit_turn("default", "s1", f"t{n}", f"question {n} " + "word " * 20, f"answer {n}")
    memory = EngramMemory(store=store, session_id="s1", token_limit=200)
    history = await memory.aget()
    assert sum(store.count_tokens(m.content or "") for m in history) <= 200
    assert history[0].role == "user" and history[-1].content == "answer 49"
    await store.client.aclose()


def test_llama_index_memory_class_persists_across_processes(memory_url: str) -> None:
    run_app("memory-put", memory_url, "s1", "I like tea", "noted: tea")
    assert json.loads(run_app("memory-get", memory_url, "s1")) == ["I like tea", "noted: tea"]


async def test_two_memory_instances_archiving_one_session_lose_and_duplicate_nothing(memory_url: str) -> None:
    def memory() -> Memory:
        store = EngramDBChatStore(store=store_from_url(memory_url))
        return Memory.from_defaults(session_id="s1", chat_store=store, token_limit=300, chat_history_token_ratio=0.5)

    first, second = memory(), memory()
    for n in range(40):
        await (first if n % 2 == 0 else second).aput(
            ChatMessage(role="user" if n % 4 < 2 else "assistant", content=f"message {n} " + "filler " * 10)
        )
    store = EngramDBChatStore(store=store_from_url(memory_url))
    everything = [m.content for m in await store.get_messages("s1", status=None)]
    assert everything == [f"message {n} " + "filler " * 10 for n in range(40)]
    assert await store.count_messages("s1", status=None) == 40
    assert 0 < await store.count_messages("s1") < 40  # some were archived


def test_chat_store_set_messages_is_atomic_under_concurrent_writers(memory_url: str) -> None:
    store = RedisChatStore.from_url(memory_url)
    lists = {name: [ChatMessage(role="user", content=f"{name} {n}") for n in range(200)] for name in ("alpha", "beta")}
    threads = [threading.Thread(target=store.set_messages, args=("s1", msgs)) for msgs in lists.values()]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    stored = [m.content for m in store.get_messages("s1")]
    assert stored in ([m.content for m in lists["alpha"]], [m.content for m in lists["beta"]])


def test_chat_store_delete_message_keeps_order_and_ttl(redis_url: str) -> None:
    store = RedisChatStore.from_url(redis_url, ttl=600)
    store.set_messages("s1", [ChatMessage(role="user", content=str(n)) for n in range(5)])
    deleted = store.delete_message("s1", 1)
    assert deleted is not None and deleted.content == "1"
    assert store.delete_last_message("s1").content == "4"  # type: ignore[union-attr]
    assert [m.content for m in store.get_messages("s1")] == ["0", "2", "3"]
    import redis as redis_sync

    ttl = redis_sync.Redis.from_url(redis_url).ttl("engram:default:{default:s1}:log")
    assert 590 <= ttl <= 600


async def test_chat_store_lists_keys_from_the_index_sync_and_async(memory_url: str) -> None:
    store = RedisChatStore.from_url(memory_url)
    await store.async_add_message("b-session", ChatMessage(role="user", content="x"))
    store.add_message("a-session", ChatMessage(role="user", content="y"))
    assert store.get_keys() == ["a-session", "b-session"] == await store.aget_keys()
    assert await store.adelete_messages("a-session") is not None
    assert store.get_keys() == ["b-session"]


def test_rich_messages_keep_their_blocks_and_kwargs(memory_url: str) -> None:
    from llama_index.core.base.llms.types import ImageBlock, TextBlock

    store = RedisChatStore.from_url(memory_url)
    rich = ChatMessage(role="user", blocks=[TextBlock(text="look"), ImageBlock(url="http://example.invalid/x.png")])
    tool = ChatMessage(role="assistant", content="calling", additional_kwargs={"tool_calls": [{"id": "1"}]})
    store.set_messages("s1", [rich, tool])
    loaded = store.get_messages("s1")
    assert loaded[0].blocks[1].url is not None and loaded[0].content == "look"
    assert loaded[1].additional_kwargs == {"tool_calls": [{"id": "1"}]}
