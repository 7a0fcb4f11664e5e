"""``RedisChatStore``: LlamaIndex's ``BaseChatStore`` on Engram's data model.

Unlike ``llama-index-storage-chat-store-redis``: ``set_messages`` is atomic (one function call, not
DEL + N RPUSH), ``add_message(..., idx=)`` inserts atomically, every write refreshes the TTL of all of
the session's keys, ``delete_message`` keeps the order and the TTL of what remains, and ``get_keys``
reads the tenant's session index (never KEYS).

Keys are any non-empty strings, mapped onto session ids as :mod:`engram.llama_index.keys` describes.
Behaviour is ``SimpleChatStore``'s (tests/llama_index/test_differential.py runs both side by side),
except where Redis makes a deliberate difference:

- a key whose last message goes is gone: ``set_messages(key, [])`` and deleting every message remove the
  key from ``get_keys`` (``SimpleChatStore`` keeps an empty list under it; LlamaIndex's Redis store
  forgets it as Engram does), so ``delete_messages`` then answers None where ``SimpleChatStore``
  answers ``[]``, and ``delete_last_message`` None where it raises IndexError;
- ``get_keys`` lists keys in session-id order, not in order of first use.

Serializable (``to_dict``/``from_dict``/``model_validate``/pickle): the copy reconnects by ``redis_url``.
"""

from __future__ import annotations

from typing import Any, TypeVar

from llama_index.core.base.llms.types import ChatMessage
from llama_index.core.bridge.pydantic import Field
from llama_index.core.storage.chat_store.base import BaseChatStore

from engram.history.store import HistoryStore
from engram.llama_index._runtime import ChatStoreFields, Operation, store_from_url
from engram.llama_index.convert import to_chat_message, to_new_message
from engram.llama_index.keys import key_for, label_for, session_id_for
from engram.messages import SessionInfo
from engram.policy import MAX_MESSAGES_PER_SESSION

__all__ = ["RedisChatStore", "keys_of", "store_from_url"]

T = TypeVar("T")


def keys_of(sessions: list[SessionInfo]) -> list[str]:
    """The LlamaIndex keys of ``sessions``; sessions no key maps to (an HTTP API session named with a
    reserved prefix, a hashed id whose stored key is gone) are not reachable by key, so not listed."""
    keys = (key_for(s.session_id, s.label) for s in sessions)
    return [key for key in keys if key is not None]


class RedisChatStore(ChatStoreFields, BaseChatStore):
    """A LlamaIndex chat store whose keys name sessions of one Engram tenant."""

    max_messages: int = Field(
        default=10_000,
        ge=MAX_MESSAGES_PER_SESSION.minimum,
        le=MAX_MESSAGES_PER_SESSION.maximum,
        description="oldest messages beyond this are trimmed",
    )

    @classmethod
    def class_name(cls) -> str:
        return "EngramRedisChatStore"

    # --- operations, each defined once and run sync or async ---------------------------------------
    def _set(self, key: str, messages: list[ChatMessage]) -> Operation[Any]:
        new, session = [to_new_message(m) for m in messages], session_id_for(key)
        return lambda store: store.replace(self.tenant, session, new, self.policy, label=label_for(key))

    def _get(self, key: str) -> Operation[list[ChatMessage]]:
        session = session_id_for(key)

        async def operation(store: HistoryStore) -> list[ChatMessage]:
            return [to_chat_message(m) for m in await store.all_messages(self.tenant, session)]

        return operation

    def _add(self, key: str, message: ChatMessage, idx: int | None) -> Operation[Any]:
        new, session, label = to_new_message(message), session_id_for(key), label_for(key)
        if idx is None:
            return lambda store: store.append(self.tenant, session, [new], self.policy, label=label)
        return lambda store: store.insert_at(self.tenant, session, idx, new, self.policy, label=label)

    def _delete_all(self, key: str) -> Operation[list[ChatMessage] | None]:
        session = session_id_for(key)

        async def operation(store: HistoryStore) -> list[ChatMessage] | None:
            stored = await store.all_messages(self.tenant, session)
            await store.delete_session(self.tenant, session)
            return [to_chat_message(m) for m in stored] if stored else None

        return operation

    def _delete_at(self, key: str, idx: int) -> Operation[ChatMessage | None]:
        session = session_id_for(key)

        async def operation(store: HistoryStore) -> ChatMessage | None:
            deleted = await store.delete_message_at(self.tenant, session, idx)
            if deleted is not None:
                return to_chat_message(deleted)
            # As list.pop: past the end is None (SimpleChatStore checks it), before the start an error.
            if idx < 0 and await store.count_messages(self.tenant, session) > 0:
                raise IndexError("pop index out of range")
            return None

        return operation

    def _keys(self) -> Operation[list[str]]:
        async def operation(store: HistoryStore) -> list[str]:
            return keys_of(await store.all_sessions(self.tenant))

        return operation

    # --- BaseChatStore --------------------------------------------------------------------------------
    def set_messages(self, key: str, messages: list[ChatMessage]) -> None:
        self.runtime.call_sync(self._set(key, messages))

    async def aset_messages(self, key: str, messages: list[ChatMessage]) -> None:
        await self.runtime.call(self._set(key, messages))

    def get_messages(self, key: str) -> list[ChatMessage]:
        return self.runtime.call_sync(self._get(key))

    async def aget_messages(self, key: str) -> list[ChatMessage]:
        return await self.runtime.call(self._get(key))

    def add_message(self, key: str, message: ChatMessage, idx: int | None = None) -> None:
        """Append ``message``, or insert it before position ``idx`` as ``list.insert`` does."""
        self.runtime.call_sync(self._add(key, message, idx))

    async def async_add_message(self, key: str, message: ChatMessage, idx: int | None = None) -> None:
        await self.runtime.call(self._add(key, message, idx))

    def delete_messages(self, key: str) -> list[ChatMessage] | None:
        return self.runtime.call_sync(self._delete_all(key))

    async def adelete_messages(self, key: str) -> list[ChatMessage] | None:
        return await self.runtime.call(self._delete_all(key))

    def delete_message(self, key: str, idx: int) -> ChatMessage | None:
        return self.runtime.call_sync(self._delete_at(key, idx))

    async def adelete_message(self, key: str, idx: int) -> ChatMessage | None:
        return await self.runtime.call(self._delete_at(key, idx))

    def delete_last_message(self, key: str) -> ChatMessage | None:
        return self.runtime.call_sync(self._delete_at(key, -1))

    async def adelete_last_message(self, key: str) -> ChatMessage | None:
        return await self.runtime.call(self._delete_at(key, -1))

    def get_keys(self) -> list[str]:
        return self.runtime.call_sync(self._keys())

    async def aget_keys(self) -> list[str]:
        return await self.runtime.call(self._keys())
