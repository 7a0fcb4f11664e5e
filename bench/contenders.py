"""The contenders of the per-turn benchmark, each over one session pre-filled with `size` messages.

A turn = load the history for the turn + store the user message and the reply; no model time. Each
contender keeps its session at `size` messages: Engram through its own retention cap (timed: it is
part of its commit), the others by trimming after the timed part (untimed, in their favour).
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import redis
from llama_index.core.base.llms.types import ChatMessage
from llama_index.core.memory import ChatMemoryBuffer
from llama_index.core.storage.chat_store import SimpleChatStore
from llama_index.storage.chat_store.redis import RedisChatStore as LlamaRedisChatStore

from engram.connections import create_redis
from engram.history import HistoryStore
from engram.messages import NewMessage
from engram.policy import Policy
from engram.redis_keys import KeySpace
from engram.settings import Settings

TOKEN_LIMIT = 3000
TTL_SECONDS = 3600
# ~60 tokens per message (tiktoken cl100k_base), as the issue asks
FILLER = "Engram keeps chat memory in Redis so any replica can serve the next turn of a conversation " * 3

ENGRAM = ("engram-hit", "engram-delta", "engram-cold", "engram-quotas")
ALTERNATIVES = ("cmb+redis", "json-get-set")
ALL_CONTENDERS = ENGRAM + ALTERNATIVES
DESCRIPTIONS = {
    "engram-hit": "Engram, the replica that served the previous turn (cached tail validated, nothing new)",
    "engram-delta": "Engram, two replicas alternating (each fetches only the other's turn)",
    "engram-cold": "Engram with its cache off (every load reads the window)",
    "engram-quotas": "engram-hit with the tenant's rate (never reached) and session and storage quotas checked",
    "cmb+redis": "LlamaIndex ChatMemoryBuffer over llama-index-storage-chat-store-redis",
    "json-get-set": "GET the JSON history, rebuild a ChatMemoryBuffer, SET it back (the seeds' pattern)",
}


def message_text(n: int) -> str:
    return f"message {n}: {FILLER}"


def role(n: int) -> str:
    return "user" if n % 2 == 0 else "assistant"


@dataclass(frozen=True)
class Turn:
    """One contender at one size: `run(n)` is timed; `settle()` (untimed) keeps the session at its size."""

    run: Callable[[int], Awaitable[None]]
    settle: Callable[[], object] = lambda: None
    window_messages: int | None = None  # messages a load hands the model (Engram's, measured at build)


class Contenders:
    def __init__(self, url: str, prefix: str = "") -> None:
        self.url = url
        self.prefix = prefix  # keeps a probe's keys apart from the main run's
        self.sync = redis.Redis.from_url(url)

    async def build(self, name: str, size: int) -> Turn:
        if name in ENGRAM:
            return await self.engram(size, name.removeprefix("engram-"))
        if name == "cmb+redis":
            return self.chat_memory_buffer(size)
        if name == "json-get-set":
            return self.json_get_set(size)
        raise ValueError(f"unknown contender {name!r}")

    def engram_store(self, cache: bool) -> HistoryStore:
        return HistoryStore(create_redis(Settings(redis_url=self.url)), KeySpace(), cache_sessions=10 if cache else 0)

    async def engram(self, size: int, mode: str) -> Turn:
        session = f"{self.prefix}engram-{mode}-{size}"
        policy = Policy(token_limit=TOKEN_LIMIT, session_ttl_seconds=TTL_SECONDS, max_messages_per_session=size)
        if mode == "quotas":
            limits = {"requests_per_second": 1_000_000, "max_sessions": 1_000_000, "max_stored_bytes": 2**40}
            policy = dataclasses.replace(policy, **limits)
        seeder = self.engram_store(cache=False)
        for start in range(0, size, 500):
            batch = [NewMessage(role(n), message_text(n)) for n in range(start, min(size, start + 500))]
            await seeder.append("bench", session, batch, policy)
        await seeder.client.aclose()
        replicas = [self.engram_store(cache=mode != "cold") for _ in range(2 if mode == "delta" else 1)]
        for replica in replicas:  # warm: function library loaded, connections open, tails cached
            window = await replica.load_window("bench", session, TOKEN_LIMIT)

        async def turn(n: int) -> None:
            replica = replicas[n % len(replicas)]
            await replica.load_window("bench", session, TOKEN_LIMIT, policy=policy)
            await replica.commit_turn("bench", session, f"t{n}", message_text(n), message_text(n + 1), policy)

        return Turn(turn, window_messages=len(window.messages))

    def chat_memory_buffer(self, size: int) -> Turn:
        key = f"{self.prefix}cmb-{size}"
        chat_store = LlamaRedisChatStore(redis_url=self.url, ttl=TTL_SECONDS)
        self.sync.delete(key)
        for start in range(0, size, 500):
            batch = [ChatMessage(role=role(n), content=message_text(n)) for n in range(start, min(size, start + 500))]
            self.sync.rpush(key, *[m.model_dump_json() for m in batch])

        async def turn(n: int) -> None:
            memory = ChatMemoryBuffer.from_defaults(token_limit=TOKEN_LIMIT, chat_store=chat_store, chat_store_key=key)
            memory.put(ChatMessage(role="user", content=message_text(n)))
            memory.get()
            memory.put(ChatMessage(role="assistant", content=message_text(n + 1)))

        return Turn(turn, settle=lambda: self.sync.ltrim(key, -size, -1))

    def json_get_set(self, size: int) -> Turn:
        key = f"{self.prefix}json-{size}"
        self.sync.set(key, json.dumps([{"role": role(n), "content": message_text(n)} for n in range(size)]))

        async def turn(n: int) -> None:
            raw = self.sync.get(key)
            stored = json.loads(raw) if raw else []
            memory = ChatMemoryBuffer.from_defaults(token_limit=TOKEN_LIMIT, chat_store=SimpleChatStore())
            memory.set([ChatMessage(role=m["role"], content=m["content"]) for m in stored])
            memory.put(ChatMessage(role="user", content=message_text(n)))
            memory.get()
            memory.put(ChatMessage(role="assistant", content=message_text(n + 1)))
            history = [{"role": m.role.value, "content": m.content} for m in memory.get_all()][-size:]
            self.sync.set(key, json.dumps(history), ex=TTL_SECONDS)

        return Turn(turn)
