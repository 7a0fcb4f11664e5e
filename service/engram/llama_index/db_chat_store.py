"""``EngramDBChatStore``: a Redis backend for LlamaIndex's ``Memory`` class.

``Memory.from_defaults(chat_store=EngramDBChatStore(store=...), session_id=...)`` keeps the active
queue in the session's log stream and archived messages in its archive stream. Archiving the oldest
messages is one atomic function call, so two ``Memory`` instances on one session neither lose nor
duplicate archived messages. Keys (``Memory``'s ``session_id``) are any non-empty strings, mapped onto
session ids as :mod:`engram.llama_index.keys` describes. Serializable: a copy reconnects by ``redis_url``.
"""

from __future__ import annotations

from contextvars import ContextVar

from llama_index.core.base.llms.types import ChatMessage
from llama_index.core.bridge.pydantic import Field
from llama_index.core.storage.chat_store.base_db import AsyncDBChatStore, MessageStatus

from engram.history.store import HistoryStore
from engram.llama_index._runtime import ChatStoreFields
from engram.llama_index.chat_store import keys_of
from engram.llama_index.convert import to_chat_message, to_new_message
from engram.llama_index.keys import label_for, session_id_for
from engram.policy import MAX_MESSAGES_PER_SESSION

ARCHIVED: ContextVar[list[list[ChatMessage]] | None] = ContextVar("engram_archived", default=None)
"""While a ``DurableMemory`` (:mod:`engram.llama_index.blocks`) flushes its window: each batch of messages
``archive_oldest_messages`` really archived, in order. LlamaIndex's ``Memory`` hands its blocks the messages
it read before archiving, which another replica may have archived already, while the ones this call
archived would reach no block."""


class EngramDBChatStore(ChatStoreFields, AsyncDBChatStore):
    max_messages: int = Field(
        default=100_000,
        ge=MAX_MESSAGES_PER_SESSION.minimum,
        le=MAX_MESSAGES_PER_SESSION.maximum,
        description="active messages beyond this are trimmed",
    )

    @classmethod
    def class_name(cls) -> str:
        return "EngramDBChatStore"

    @property
    def _store(self) -> HistoryStore:
        return self.runtime.current()

    async def get_messages(
        self,
        key: str,
        status: MessageStatus | None = MessageStatus.ACTIVE,
        limit: int | None = None,
        offset: int | None = None,
    ) -> list[ChatMessage]:
        statuses = [MessageStatus.ARCHIVED, MessageStatus.ACTIVE] if status is None else [status]
        stored = []
        for each in statuses:  # archived messages are older than every active one
            stored += await self._store.all_messages(
                self.tenant, session_id_for(key), archived=each == MessageStatus.ARCHIVED
            )
        start = offset or 0
        stored = stored[start : None if limit is None else start + limit]
        return [to_chat_message(m) for m in stored]

    async def count_messages(self, key: str, status: MessageStatus | None = MessageStatus.ACTIVE) -> int:
        active = await self._store.count_messages(self.tenant, session_id_for(key))
        if status == MessageStatus.ACTIVE:
            return active
        archived = await self._store.count_messages(self.tenant, session_id_for(key), archived=True)
        return archived if status == MessageStatus.ARCHIVED else active + archived

    def _refuse_archived_writes(self, status: MessageStatus) -> None:
        if status != MessageStatus.ACTIVE:
            raise ValueError("only active messages can be written; archive them with archive_oldest_messages")

    async def add_message(self, key: str, message: ChatMessage, status: MessageStatus = MessageStatus.ACTIVE) -> None:
        await self.add_messages(key, [message], status)

    async def add_messages(
        self, key: str, messages: list[ChatMessage], status: MessageStatus = MessageStatus.ACTIVE
    ) -> None:
        self._refuse_archived_writes(status)
        if messages:
            await self._store.append(
                self.tenant,
                session_id_for(key),
                [to_new_message(m) for m in messages],
                self.policy,
                label=label_for(key),
            )

    async def set_messages(
        self, key: str, messages: list[ChatMessage], status: MessageStatus = MessageStatus.ACTIVE
    ) -> None:
        self._refuse_archived_writes(status)
        await self._store.replace(
            self.tenant, session_id_for(key), [to_new_message(m) for m in messages], self.policy, label=label_for(key)
        )

    async def delete_message(self, key: str, idx: int) -> ChatMessage | None:
        deleted = await self._store.delete_message_at(self.tenant, session_id_for(key), idx)
        return to_chat_message(deleted) if deleted else None

    async def delete_messages(self, key: str, status: MessageStatus | None = None) -> None:
        if status is None:
            await self._store.delete_session(self.tenant, session_id_for(key))
        elif status == MessageStatus.ACTIVE:
            await self._store.replace(self.tenant, session_id_for(key), [], self.policy, label=label_for(key))
        else:
            await self._store.delete_archive(self.tenant, session_id_for(key))

    async def delete_oldest_messages(self, key: str, n: int) -> list[ChatMessage]:
        return [
            to_chat_message(m)
            for m in await self._store.take_oldest(self.tenant, session_id_for(key), n, archive=False)
        ]

    async def archive_oldest_messages(self, key: str, n: int) -> list[ChatMessage]:
        archived = [
            to_chat_message(m) for m in await self._store.take_oldest(self.tenant, session_id_for(key), n, archive=True)
        ]
        batches = ARCHIVED.get()
        if batches is not None:
            batches.append(archived)
        return archived

    async def get_keys(self) -> list[str]:
        return keys_of(await self._store.all_sessions(self.tenant))
