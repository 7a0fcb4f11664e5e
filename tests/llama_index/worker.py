"""LlamaIndex apps in their own OS processes (another replica, or the app after a restart)."""

from __future__ import annotations

import asyncio
import json
import sys

from llama_index.core.chat_engine import SimpleChatEngine
from llama_index.core.memory import Memory

from engram.llama_index import EngramDBChatStore, EngramMemory, store_from_url
from tests.llama_index.recall_llm import RecallLLM


def chat_sync(url: str, session: str, message: str) -> None:
    """The sync API, as most LlamaIndex examples use it."""
    memory = EngramMemory(store=store_from_url(url), session_id=session, token_limit=3000)
    print(SimpleChatEngine.from_defaults(llm=RecallLLM(), memory=memory).chat(message).response)


async def chat_async(url: str, session: str, message: str) -> None:
    memory = EngramMemory(store=store_from_url(url), session_id=session, token_limit=3000)
    print((await SimpleChatEngine.from_defaults(llm=RecallLLM(), memory=memory).achat(message)).response)


async def memory_put(url: str, session: str, *contents: str) -> None:
    memory = Memory.from_defaults(chat_store=EngramDBChatStore(store=store_from_url(url)), session_id=session)
    from llama_index.core.base.llms.types import ChatMessage

    for n, content in enumerate(contents):
        await memory.aput(ChatMessage(role="user" if n % 2 == 0 else "assistant", content=content))


async def memory_get(url: str, session: str) -> None:
    memory = Memory.from_defaults(chat_store=EngramDBChatStore(store=store_from_url(url)), session_id=session)
    print(json.dumps([m.content for m in await memory.aget()]))


if __name__ == "__main__":
    command, *args = sys.argv[1:]
    if command == "chat-sync":
        chat_sync(*args)
    else:
        coroutine = {"chat-async": chat_async, "memory-put": memory_put, "memory-get": memory_get}[command]
        asyncio.run(coroutine(*args))
