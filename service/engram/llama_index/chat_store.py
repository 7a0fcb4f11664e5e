"""``RedisChatStore``: LlamaIndex's ``BaseChatStore`` on Engram's data model.

Unlike ``llama-index-storage-chat-store-redis``: ``set_messages`` is atomic (one function call, not
DEL + N RPUSH), every write refreshes the TTL of all of the session's keys, ``delete_message`` keeps
the order and the TTL of what remains, and ``get_keys`` reads the tenant's session index (never KEYS).
Chat-store keys are Engram session ids (``[A-Za-z0-9][A-Za-z0-9._-]{0,127}``).
"""

from __future__ import annotations

from typing import Any, TypeVar

from llama_index.core.base.llms.types import ChatMessage
from llama_index.core.bridge.pydantic import Field, PrivateAttr
from llama_index.core.storage.chat_store.base import BaseChatStore

from engram.connections import create_redis
from engram.history.store import HistoryStore
from engram.llama_index._runtime import Operation, StoreRuntime
from engram.llama_index.convert import to_chat_message, to_new_message
from engram.policy import MAX_MESSAGES_PER_SESSION, SESSION_TTL_SECONDS, Policy
from engram.redis_keys import KeySpace
from engram.settings import Settings

T = TypeVar("T")


class _StoreBacked:
    """Sync and async execution of one store operation, shared by the chat-store adapters."""

    _runtime: StoreRuntime

    def _run(self, operation: Operation[T]) -> T:
        return self._runtime.call_sync(operation)

    async def _arun(self, operation: Operation[T]) -> T:
        return await self._runtime.call(operation)


def store_from_url(url: str, namespace: str = "engram", **settings: Any) -> HistoryStore:
    """A :class:`HistoryStore` on ``url`` with Engram's default timeouts."""
    config = Settings(redis_url=url, namespace=namespace, **settings)
    return HistoryStore(create_redis(config), KeySpace(namespace), cache_sessions=config.cache_sessions)


class RedisChatStore(_StoreBacked, BaseChatStore):
    """A LlamaIndex chat store whose keys are session ids of one Engram tenant."""

    tenant: str = Field(default="default", description="tenant (DNS label) the sessions belong to")
    ttl: int = Field(
        default=0,
        ge=SESSION_TTL_SECONDS.minimum,
        le=SESSION_TTL_SECONDS.maximum,
        description="seconds an idle session lives; 0 = forever",
    )
    max_messages: int = Field(
        default=10_000,
        ge=MAX_MESSAGES_PER_SESSION.minimum,
        le=MAX_MESSAGES_PER_SESSION.maximum,
        description="oldest messages beyond this are trimmed",
    )

    _runtime: StoreRuntime = PrivateAttr()

    def __init__(self, *, store: HistoryStore, **data: Any) -> None:
        super().__init__(**data)
        self._runtime = StoreRuntime(store)

    @classmethod
    def from_url(cls, url: str, **data: Any) -> RedisChatStore:
        return cls(store=store_from_url(url), **data)

    @classmethod
    def class_name(cls) -> str:
        return "EngramRedisChatStore"

    @property
    def policy(self) -> Policy:
        return Policy(session_ttl_seconds=self.ttl, max_messages_per_session=self.max_messages)

    # --- operations, each defined once and run sync or async ---------------------------------------
    def _set(self, key: str, messages: list[ChatMessage]) -> Operation[Any]:
        new = [to_new_message(m) for m in messages]
        return lambda store: store.replace(self.tenant, key, new, self.policy)

    def _get(self, key: str) -> Operation[list[ChatMessage]]:
        async def operation(store: HistoryStore) -> list[ChatMessage]:
            return [to_chat_message(m) for m in await store.all_messages(self.tenant, key)]

        return operation

    def _add(self, key: str, message: ChatMessage) -> Operation[Any]:
        new = [to_new_message(message)]
        return lambda store: store.append(self.tenant, key, new, self.policy)

    def _delete_all(self, key: str) -> Operation[list[ChatMessage] | None]:
        async def operation(store: HistoryStore) -> list[ChatMessage] | None:
            stored = await store.all_messages(self.tenant, key)
            await store.delete_session(self.tenant, key)
            return [to_chat_message(m) for m in stored] if stored else None

        return operation

    def _delete_at(self, key: str, idx: int) -> Operation[ChatMessage | None]:
        async def operation(store: HistoryStore) -> ChatMessage | None:
            deleted = await store.delete_message_at(self.tenant, key, idx)
            return to_chat_message(deleted) if deleted else None

        return operation

    def _keys(self) -> Operation[list[str]]:
        return lambda store: store.session_ids(self.tenant)

    # --- BaseChatStore --------------------------------------------------------------------------------
    def set_messages(self, key: str, messages: list[ChatMessage]) -> None:
        self._run(self._set(key, messages))

    async def aset_messages(self, key: str, messages: list[ChatMessage]) -> None:
        await self._arun(self._set(key, messages))

    def get_messages(self, key: str) -> list[ChatMessage]:
        return self._run(self._get(key))

    async def aget_messages(self, key: str) -> list[ChatMessage]:
        return await self._arun(self._get(key))

    def add_message(self, key: str, message: ChatMessage) -> None:
        self._run(self._add(key, message))

    async def async_add_message(self, key: str, message: ChatMessage) -> None:
        await self._arun(self._add(key, message))

    def delete_messages(self, key: str) -> list[ChatMessage] | None:
        return self._run(self._delete_all(key))

    async def adelete_messages(self, key: str) -> list[ChatMessage] | None:
        return await self._arun(self._delete_all(key))

    def delete_message(self, key: str, idx: int) -> ChatMessage | None:
        return self._run(self._delete_at(key, idx))

    async def adelete_message(self, key: str, idx: int) -> ChatMessage | None:
        return await self._arun(self._delete_at(key, idx))

    def delete_last_message(self, key: str) -> ChatMessage | None:
        return self._run(self._delete_at(key, -1))

    async def adelete_last_message(self, key: str) -> ChatMessage | None:
        return await self._arun(self._delete_at(key, -1))

    def get_keys(self) -> list[str]:
        return self._run(self._keys())

    async def aget_keys(self) -> list[str]:
        return await self._arun(self._keys())
