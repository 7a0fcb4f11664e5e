"""LlamaIndex adapters on Engram's Redis history, for use in any LlamaIndex app.

- :class:`EngramMemory` - ``memory=`` for chat engines; a drop-in for ``ChatMemoryBuffer`` that loads
  only the window (2 Redis round trips per turn, flat in the length of the conversation).
- :class:`RedisChatStore` - a ``BaseChatStore`` (sync and async) without the races of the usual one.
- :class:`EngramDBChatStore` - a Redis backend for LlamaIndex's ``Memory`` class.
- :class:`EngramFactExtractionMemoryBlock`, :class:`EngramStaticMemoryBlock` - ``Memory`` blocks whose state
  lives in Redis per session, shared by every replica; :func:`durable_memory` builds a ``Memory`` with them.
- :class:`EchoLLM` - an offline, deterministic LLM that shows what memory a chat engine was given.
"""

from engram.llama_index.blocks import EngramFactExtractionMemoryBlock, EngramStaticMemoryBlock, durable_memory
from engram.llama_index.chat_store import RedisChatStore, store_from_url
from engram.llama_index.db_chat_store import EngramDBChatStore
from engram.llama_index.echo import EchoLLM
from engram.llama_index.memory import EngramMemory

__all__ = [
    "EchoLLM",
    "EngramDBChatStore",
    "EngramFactExtractionMemoryBlock",
    "EngramMemory",
    "EngramStaticMemoryBlock",
    "RedisChatStore",
    "durable_memory",
    "store_from_url",
]
