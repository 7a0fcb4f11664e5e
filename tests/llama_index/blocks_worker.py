"""LlamaIndex apps with durable memory blocks, each in its own OS process (another replica, or a restart)."""

from __future__ import annotations

import asyncio
import json
import sys

from llama_index.core.base.llms.types import ChatMessage
from llama_index.core.memory.memory_blocks import FactExtractionMemoryBlock, StaticMemoryBlock

from engram.llama_index import EngramFactExtractionMemoryBlock, EngramStaticMemoryBlock, durable_memory
from tests.llama_index.fact_llm import FactLLM


async def learn(url: str, session: str, *turns: str) -> None:
    """Chat through a small ``Memory``: older turns are flushed into the fact block. Prints the facts."""
    memory = durable_memory(
        session, redis_url=url, token_limit=20, token_flush_size=6, tokenizer_fn=str.split,
        memory_blocks=[FactExtractionMemoryBlock(llm=FactLLM())],
    )  # fmt: skip
    for n, turn in enumerate(turns):
        await memory.aput(ChatMessage(role="user", content=turn))
        await memory.aput(ChatMessage(role="assistant", content=f"noted {n}"))
    block = memory.memory_blocks[0]
    assert isinstance(block, EngramFactExtractionMemoryBlock)
    print(json.dumps(await block.aget_facts(session)))


async def recall(url: str, session: str) -> None:
    """A fresh ``Memory`` on the session: prints what it hands the model, as one text."""
    memory = durable_memory(session, redis_url=url, memory_blocks=[FactExtractionMemoryBlock(llm=FactLLM())])
    print(json.dumps("\n".join(m.content or "" for m in await memory.aget())))


async def extract(url: str, session: str, name: str, count: str, max_facts: str) -> None:
    """Wait for "go" on stdin (so the processes run at once), then extract ``count`` facts, one put each."""
    block = EngramFactExtractionMemoryBlock(redis_url=url, llm=FactLLM(), max_facts=int(max_facts))
    print("ready", flush=True)
    assert sys.stdin.readline().strip() == "go"
    for n in range(int(count)):
        await block.aput([ChatMessage(role="user", content=f"{name} fact {n}")], session_id=session)
    print("done", flush=True)


async def converse(url: str, session: str, name: str, count: str) -> None:
    """Wait for "go" on stdin, then chat ``count`` turns through a small ``Memory`` on the shared session."""
    memory = durable_memory(
        session, redis_url=url, token_limit=30, token_flush_size=6, tokenizer_fn=str.split,
        memory_blocks=[FactExtractionMemoryBlock(llm=FactLLM(), max_facts=10_000)],
    )  # fmt: skip
    print("ready", flush=True)
    assert sys.stdin.readline().strip() == "go"
    for n in range(int(count)):
        await memory.aput(ChatMessage(role="user", content=f"{name} says {n}"))
        await memory.aput(ChatMessage(role="assistant", content=f"ok {name} {n}"))
    print("done", flush=True)


async def set_static(url: str, session: str, text: str) -> None:
    memory = durable_memory(session, redis_url=url, memory_blocks=[StaticMemoryBlock(static_content="default")])
    block = memory.memory_blocks[0]
    assert isinstance(block, EngramStaticMemoryBlock)
    await block.aset_content(text, session)


async def get_static(url: str, *sessions: str) -> None:
    """Prints what a fresh ``Memory`` of each session hands the model (one text per session)."""
    seen = []
    for session in sessions:
        memory = durable_memory(session, redis_url=url, memory_blocks=[StaticMemoryBlock(static_content="default")])
        seen.append("\n".join(m.content or "" for m in await memory.aget()))
    print(json.dumps(seen[0] if len(seen) == 1 else seen))


if __name__ == "__main__":
    command, *args = sys.argv[1:]
    work = {
        "learn": learn,
        "recall": recall,
        "extract": extract,
        "converse": converse,
        "set-static": set_static,
        "get-static": get_static,
    }
    asyncio.run(work[command](*args))
