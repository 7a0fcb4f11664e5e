"""Summary mode (ENGRAM_MEMORY=summary): the hot path's cost against history length, what summarizing costs
per message, and LlamaIndex's ChatSummaryMemoryBuffer over its Redis chat store at the same sizes.

- `engram-summary`: two replicas alternating (as `engram-delta`), each turn = one load (window + summary) and
  one commit, timed. After each turn, untimed, the summary is advanced when the load said a batch had fallen
  out of the window: what a replica's background task does, off the turn's path.
- summarizing: the time of those advances per message folded (steady state: a batch at a time), and of one
  catch-up over the whole backlog at each size (folds of 64), with Engram's deterministic echo extract as the
  summarizer, so the memory's own work is measured, not a model's.
- `csmb+redis`: `ChatSummaryMemoryBuffer` over llama-index-storage-chat-store-redis with a deterministic local
  LLM (Engram's `EchoLLM`). Its first `get` folds everything older than the window into one summary message
  and rewrites the stored list as that summary + the window (the rest of the history is gone from the store),
  so the session is re-seeded to its size after each timed turn (untimed): each turn is measured at the
  size. `csmb-steady` is its steady state once collapsed (the window + the summary, summarized again on
  every turn, on the caller's path), measured once.

    python -m bench.summary                                              # the full run (make bench)
    python -m bench.summary --sizes 10,100 --turns 3 --json /tmp/s.json  # a smoke run
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import tempfile
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import redis
from llama_index.core.base.llms.types import ChatMessage
from llama_index.core.memory import ChatSummaryMemoryBuffer
from llama_index.storage.chat_store.redis import RedisChatStore as LlamaRedisChatStore

from bench.contenders import TOKEN_LIMIT, TTL_SECONDS, message_text, role
from bench.turn_cost import count_commands, p99
from engram.connections import create_redis
from engram.echo import echo_summary
from engram.history import HistoryStore
from engram.history.summary import DEFAULT_SUMMARY_BATCH, DEFAULT_SUMMARY_MAX_TOKENS, SummaryBudget, advance_summary
from engram.llama_index.echo import EchoLLM
from engram.messages import NewMessage, StoredMessage, Window
from engram.policy import Policy
from engram.redis_keys import KeySpace
from engram.settings import Settings
from engram.tokens import default_tokenizer
from testkit.redis_server import RedisServer

ROOT = Path(__file__).resolve().parents[1]
BUDGET = SummaryBudget.of(TOKEN_LIMIT, DEFAULT_SUMMARY_MAX_TOKENS)
TENANT = "bench"


@dataclass
class HotPath:
    size: int
    contender: str
    turns: int = 0
    median_ms: float | None = None
    p99_ms: float | None = None
    round_trips: float | None = None
    window_messages: int | None = None
    note: str = ""
    samples_ms: list[float] = field(default_factory=list, repr=False)


@dataclass
class Summarizing:
    size: int
    kind: str  # "steady" (a batch after a turn) or "catch-up" (the whole backlog at once)
    messages: int
    calls: int
    seconds: float

    @property
    def ms_per_message(self) -> float | None:
        return 1000 * self.seconds / self.messages if self.messages else None


async def echo(previous: str, messages: Sequence[StoredMessage], max_tokens: int) -> str:
    return echo_summary(previous, messages, max_tokens, default_tokenizer())


def engram_store(url: str) -> HistoryStore:
    return HistoryStore(create_redis(Settings(redis_url=url)), KeySpace(), cache_sessions=10)


@dataclass
class EngramSummary:
    """One session of `size` messages in summary mode, served by two replicas alternating."""

    size: int
    replicas: list[HistoryStore]
    session: str
    policy: Policy
    last: Window | None = None
    steady: Summarizing | None = None

    @classmethod
    async def build(cls, url: str, size: int) -> tuple[EngramSummary, Summarizing]:
        session = f"summary-{size}"
        policy = Policy(token_limit=TOKEN_LIMIT, session_ttl_seconds=TTL_SECONDS, max_messages_per_session=size)
        seeder = engram_store(url)
        for start in range(0, size, 500):
            batch = [NewMessage(role(n), message_text(n)) for n in range(start, min(size, start + 500))]
            await seeder.append(TENANT, session, batch, policy)
        started = time.perf_counter()
        advance = await advance_summary(seeder, TENANT, session, echo, BUDGET, max_rounds=1_000_000)
        catch_up = Summarizing(size, "catch-up", advance.messages, advance.calls, time.perf_counter() - started)
        await seeder.client.aclose()
        replicas = [engram_store(url) for _ in range(2)]
        for replica in replicas:  # warm: function library loaded, connections open, tails cached
            await replica.load_window(TENANT, session, BUDGET.window_tokens, summary_batch=DEFAULT_SUMMARY_BATCH)
        return cls(size, replicas, session, policy, steady=Summarizing(size, "steady", 0, 0, 0.0)), catch_up

    async def run(self, n: int) -> None:
        replica = self.replicas[n % 2]
        self.last = await replica.load_window(
            TENANT, self.session, BUDGET.window_tokens, summary_batch=DEFAULT_SUMMARY_BATCH
        )
        await replica.commit_turn(TENANT, self.session, f"t{n}", message_text(n), message_text(n + 1), self.policy)

    async def settle(self) -> None:
        """What the replica's background task does after the turn (untimed: off the turn's path)."""
        window, steady = self.last, self.steady
        if window is None or steady is None or window.summary is None or not window.summary.due:
            return
        started = time.perf_counter()
        advance = await advance_summary(
            self.replicas[0], TENANT, self.session, echo, BUDGET, before=window.messages[0].id
        )
        steady.seconds += time.perf_counter() - started
        steady.messages += advance.messages
        steady.calls += advance.calls

    async def close(self) -> None:
        for replica in self.replicas:
            await replica.client.aclose()


class SummaryBuffer:
    """LlamaIndex's ChatSummaryMemoryBuffer over its Redis chat store, re-seeded to `size` after each turn."""

    def __init__(self, url: str, size: int, reseed: bool = True) -> None:
        self.size, self.reseed = size, reseed
        self.key = f"csmb-{size}-{'sized' if reseed else 'steady'}"
        self.sync = redis.Redis.from_url(url)
        self.chat_store = LlamaRedisChatStore(redis_url=url, ttl=TTL_SECONDS)
        self.llm = EchoLLM()
        self.seed()

    def seed(self) -> None:
        self.sync.delete(self.key)
        for start in range(0, self.size, 500):
            batch = [
                ChatMessage(role=role(n), content=message_text(n)) for n in range(start, min(self.size, start + 500))
            ]
            self.sync.rpush(self.key, *[m.model_dump_json() for m in batch])

    async def run(self, n: int) -> None:
        memory = ChatSummaryMemoryBuffer.from_defaults(
            llm=self.llm, token_limit=TOKEN_LIMIT, chat_store=self.chat_store, chat_store_key=self.key
        )
        memory.put(ChatMessage(role="user", content=message_text(n)))
        memory.get()
        memory.put(ChatMessage(role="assistant", content=message_text(n + 1)))

    async def settle(self) -> None:
        if self.reseed:
            self.seed()


async def timed_turns(
    run: Callable[[int], Awaitable[None]], settle: Callable[[], Awaitable[None]], count: int, budget_s: float
) -> list[float]:
    samples: list[float] = []
    spent = 0.0
    for i in range(count):
        if spent > budget_s and len(samples) >= 3:
            break
        started = time.perf_counter()
        await run(i)
        elapsed = time.perf_counter() - started
        await settle()
        samples.append(elapsed * 1000)
        spent += elapsed
    return samples


def summarize_rows(name: str, size: int, samples: list[float]) -> HotPath:
    return HotPath(size, name, len(samples), statistics.median(samples), p99(samples), samples_ms=samples)


async def run(sizes: list[int], turns: int, budget_s: float, csmb_turns: int) -> dict[str, object]:
    hot: list[HotPath] = []
    summarizing: list[Summarizing] = []
    with tempfile.TemporaryDirectory() as tmp:
        server = RedisServer(Path(tmp), None, "--appendfsync", "everysec").start()
        try:
            for size in sizes:
                engram, catch_up = await EngramSummary.build(server.url, size)
                samples = await timed_turns(engram.run, engram.settle, turns, budget_s)
                row = summarize_rows("engram-summary", size, samples)
                row.window_messages = len(engram.last.messages) if engram.last else None
                row.round_trips = await count_commands(engram.run, server.port, turns + 10)
                hot.append(row)
                summarizing += [catch_up, *([engram.steady] if engram.steady else [])]
                await engram.close()
                buffer = SummaryBuffer(server.url, size)
                samples = await timed_turns(buffer.run, buffer.settle, csmb_turns, budget_s)
                row = summarize_rows("csmb+redis", size, samples)
                row.round_trips = await count_commands(buffer.run, server.port, csmb_turns + 10, turns=1)
                row.note = "re-seeded to its size after each turn (untimed)"
                hot.append(row)
                for line in (hot[-2], hot[-1]):
                    print(
                        f"{size:>6} {line.contender:<15} n={line.turns:<4} median {line.median_ms:10.3f} ms  "
                        f"p99 {line.p99_ms:10.3f} ms  round trips {line.round_trips:6.1f}",
                        flush=True,
                    )
                for s in summarizing[-2:]:
                    per = f"{s.ms_per_message:.4f} ms/message" if s.ms_per_message is not None else "nothing to fold"
                    print(f"{size:>6} summarizing {s.kind:<9} {s.messages:>6} messages in {s.calls:>4} calls: {per}")
            steady = SummaryBuffer(server.url, sizes[0], reseed=False)
            samples = await timed_turns(steady.run, steady.settle, turns, budget_s)
            row = summarize_rows("csmb-steady", sizes[0], samples)
            row.note = "its steady state: the stored list collapsed to summary + window, re-summarized every turn"
            hot.append(row)
            print(f"       csmb-steady     n={row.turns:<4} median {row.median_ms:10.3f} ms", flush=True)
        finally:
            server.stop()
    engram_rows = {r.size: r for r in hot if r.contender == "engram-summary"}
    small, large = min(engram_rows), max(engram_rows)
    growth = (engram_rows[large].median_ms or 0) / (engram_rows[small].median_ms or 1)
    print(f"engram-summary hot path: {large:,} vs {small:,} messages = {growth:.2f}x (target <= 1.5x)")
    return {
        "token_limit": TOKEN_LIMIT,
        "summary_tokens": BUDGET.summary_tokens,
        "window_tokens": BUDGET.window_tokens,
        "batch": DEFAULT_SUMMARY_BATCH,
        "hot_path": [asdict(r) for r in hot],
        "summarizing": [{**asdict(s), "ms_per_message": s.ms_per_message} for s in summarizing],
        "growth": {"from": small, "to": large, "ratio": growth},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="100,1000,10000", help="history lengths (messages)")
    parser.add_argument("--turns", type=int, default=200, help="Engram turns per size")
    parser.add_argument("--csmb-turns", type=int, default=20, help="ChatSummaryMemoryBuffer turns per size (slow)")
    parser.add_argument("--budget", type=float, default=30.0, help="seconds a contender may spend per size")
    parser.add_argument("--json", type=Path, default=ROOT / "bench" / "results" / "summary.json")
    args = parser.parse_args()
    sizes = sorted(int(s) for s in args.sizes.split(","))
    result = asyncio.run(run(sizes, args.turns, args.budget, args.csmb_turns))
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=1))
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
