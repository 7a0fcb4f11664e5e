"""Per-turn memory cost: Engram vs what users pick instead, measured interleaved in one run.

A "turn" = load the history window for the turn + store the user message and the reply (no model time).
Contenders, on the same redis-server started here:
  engram-hit    one replica: its cached tail is validated, nothing new to fetch
  engram-delta  two replicas alternating: each fetches the other's turn
  engram-cold   no cache: every load reads the window
  cmb+redis     LlamaIndex ChatMemoryBuffer over llama-index-storage-chat-store-redis
  json-get-set  GET the JSON history, rebuild a ChatMemoryBuffer, SET it back (the seeds' pattern)

Run: `make bench` (or `python -m bench.turn_cost --sizes 10,1000 --turns 20`). Writes docs/benchmarks.md
and docs/benchmarks.png unless --no-write.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import redis
from llama_index.core.base.llms.types import ChatMessage
from llama_index.core.memory import ChatMemoryBuffer
from llama_index.core.storage.chat_store import SimpleChatStore
from llama_index.storage.chat_store.redis import RedisChatStore as LlamaRedisChatStore

from engram.connections import create_redis
from engram.history import HistoryStore
from engram.keys import KeySpace
from engram.models import NewMessage, Policy
from engram.settings import Settings
from tests.support.redis_server import RedisServer

ROOT = Path(__file__).resolve().parents[1]
TOKEN_LIMIT = 3000
POLICY = Policy(token_limit=TOKEN_LIMIT, session_ttl_seconds=0, max_messages_per_session=1_000_000)
# ~60 tokens per message, as the issue specifies
FILLER = "Engram keeps chat memory in Redis so any replica can serve the next turn of a conversation " * 3


def message_text(n: int) -> str:
    return f"message {n}: {FILLER}"


Turn = Callable[[int], Awaitable[None]]


class Contenders:
    """Builds each contender's per-turn function over a session pre-filled with `size` messages."""

    def __init__(self, url: str, port: int) -> None:
        self.url, self.port = url, port
        self.sync = redis.Redis(port=port)

    def engram_store(self, cache: bool) -> HistoryStore:
        return HistoryStore(create_redis(Settings(redis_url=self.url)), KeySpace(), cache_sessions=10 if cache else 0)

    async def seed_engram(self, session: str, size: int) -> None:
        store = self.engram_store(cache=False)
        for start in range(0, size, 500):
            batch = [
                NewMessage("user" if n % 2 == 0 else "assistant", message_text(n))
                for n in range(start, min(size, start + 500))
            ]
            await store.append("bench", session, batch, POLICY)
        await store.client.aclose()

    async def build(self, name: str, size: int) -> Turn:
        if name.startswith("engram-"):
            return await self.engram(size, name.removeprefix("engram-"))
        return await {"cmb+redis": self.chat_memory_buffer, "json-get-set": self.json_get_set}[name](size)

    async def engram(self, size: int, mode: str) -> Turn:
        session = f"engram-{mode}-{size}"
        await self.seed_engram(session, size)
        replicas = [self.engram_store(cache=mode != "cold") for _ in range(2 if mode == "delta" else 1)]
        for replica in replicas:  # warm: library loaded, connections open, tails cached
            await replica.load_window("bench", session, TOKEN_LIMIT)

        async def turn(n: int) -> None:
            replica = replicas[n % len(replicas)]
            await replica.load_window("bench", session, TOKEN_LIMIT)
            await replica.commit_turn("bench", session, f"t{n}", message_text(n), message_text(n + 1), POLICY)

        return turn

    async def chat_memory_buffer(self, size: int) -> Turn:
        key = f"cmb-{size}"
        chat_store = LlamaRedisChatStore(redis_url=self.url)
        messages = [
            ChatMessage(role="user" if n % 2 == 0 else "assistant", content=message_text(n)) for n in range(size)
        ]
        self.sync.rpush(key, *[json.dumps(m.model_dump(mode="json")) for m in messages]) if messages else None

        async def turn(n: int) -> None:
            memory = ChatMemoryBuffer.from_defaults(token_limit=TOKEN_LIMIT, chat_store=chat_store, chat_store_key=key)
            memory.put(ChatMessage(role="user", content=message_text(n)))
            memory.get()
            memory.put(ChatMessage(role="assistant", content=message_text(n + 1)))

        return turn

    async def json_get_set(self, size: int) -> Turn:
        key = f"json-{size}"
        history = [{"role": "user" if n % 2 == 0 else "assistant", "content": message_text(n)} for n in range(size)]
        self.sync.set(key, json.dumps(history))

        async def turn(n: int) -> None:
            raw = self.sync.get(key)
            stored = json.loads(raw) if raw else []
            messages = [ChatMessage(role=m["role"], content=m["content"]) for m in stored]
            memory = ChatMemoryBuffer.from_defaults(token_limit=TOKEN_LIMIT, chat_store=SimpleChatStore())
            memory.set(messages)
            memory.put(ChatMessage(role="user", content=message_text(n)))
            memory.get()
            memory.put(ChatMessage(role="assistant", content=message_text(n + 1)))
            self.sync.set(key, json.dumps([{"role": m.role.value, "content": m.content} for m in memory.get_all()]))

        return turn


async def measure(
    turns: dict[tuple[int, str], Turn], count: int, budget_s: float
) -> dict[tuple[int, str], list[float]]:
    """Run the contenders' turns interleaved (turn i of each, then turn i+1 ...), so drift hits all alike.
    A contender whose turns have used up `budget_s` stops early (its sample is then smaller)."""
    samples: dict[tuple[int, str], list[float]] = {name: [] for name in turns}
    spent = dict.fromkeys(turns, 0.0)
    for i in range(count):
        for name, turn in turns.items():
            if spent[name] > budget_s:
                continue
            started = time.perf_counter()
            await turn(i)
            elapsed = time.perf_counter() - started
            samples[name].append(elapsed)
            spent[name] += elapsed
    return samples


def p99(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(0.99 * (len(ordered) - 1)))]


ALL_CONTENDERS = ("engram-hit", "engram-delta", "engram-cold", "cmb+redis", "json-get-set")


async def run(
    sizes: list[int], count: int, budget_s: float, only: tuple[str, ...] = ALL_CONTENDERS
) -> list[dict[str, object]]:
    rows: list[dict[str, object]] = []
    with tempfile.TemporaryDirectory() as tmp:
        server = RedisServer(Path(tmp), None, "--appendfsync", "everysec").start()
        try:
            contenders = Contenders(server.url, server.port)
            turns: dict[tuple[int, str], Turn] = {}
            for size in sizes:
                for name in only:
                    turns[(size, name)] = await contenders.build(name, size)
            # Every size and contender interleaved: machine noise hits all of them alike.
            samples = await measure(turns, count, budget_s)
            for (size, name), values in samples.items():
                rows.append({
                    "size": size, "contender": name, "turns": len(values),
                    "median_ms": statistics.median(values) * 1000, "p99_ms": p99(values) * 1000,
                })  # fmt: skip
                print(f"{size:>6} {name:<13} n={len(values):<4} median {rows[-1]['median_ms']:9.3f} ms"
                      f"  p99 {rows[-1]['p99_ms']:9.3f} ms", flush=True)  # fmt: skip
        finally:
            server.stop()
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="10,100,1000,10000", help="history lengths (messages)")
    parser.add_argument("--turns", type=int, default=50, help="turns per contender and size")
    parser.add_argument("--budget", type=float, default=20.0, help="seconds a contender may spend per size")
    parser.add_argument("--only", default=",".join(ALL_CONTENDERS), help="contenders to run")
    parser.add_argument("--json", type=Path, help="also write the rows as JSON here")
    args = parser.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    rows = asyncio.run(run(sizes, args.turns, args.budget, tuple(args.only.split(","))))
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
