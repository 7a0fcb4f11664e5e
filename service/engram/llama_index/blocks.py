"""Durable memory blocks for LlamaIndex's ``Memory``: their state lives in Redis per session, not in the process.

LlamaIndex's ``FactExtractionMemoryBlock`` keeps its facts in a Python list and ``StaticMemoryBlock`` its
content in the object, so what one replica learnt the next one never sees and a restart forgets it. Here:

- :class:`EngramFactExtractionMemoryBlock` extracts facts with the same prompts, parsing and formatting as
  LlamaIndex's block, and keeps them in Redis per (tenant, session): every process sees every fact. Adding
  facts is additive and idempotent (no fact another replica added concurrently is lost); condensing them
  when there are more than ``max_facts`` is a compare-and-set that keeps facts added meanwhile (see
  :mod:`engram.history.blocks`).
- :class:`EngramStaticMemoryBlock` returns the content stored for the session (set with ``aset_content``
  from any process), or its ``static_content`` for a session whose content was never set.
- :func:`durable_memory` builds a LlamaIndex ``Memory`` (a :class:`DurableMemory`) on
  :class:`EngramDBChatStore` whose fact and static blocks (LlamaIndex's or these) keep their state in Redis,
  and whose flushes hand the fact blocks the messages the store really archived (so concurrent replicas'
  flushes lose none). Other blocks (e.g. ``VectorMemoryBlock``) are kept as they are: their state is
  already in the vector store the user gave them.

A block serves any session: ``Memory`` hands it its ``session_id`` on every read and write, and the block
keeps nothing of a session in the process (``facts`` stays empty), so one block object may be shared by the
memories of many sessions, pickled, or rebuilt from its fields: it reconnects by ``redis_url``. A block
built with ``session_key=`` is bound to that session (for use outside ``Memory``; a ``Memory`` of another
session is refused).

Bounds: after a condensation this process committed, the block holds at most ``max_facts``. Between
condensations the set holds what extractions added: a put that brings it over ``max_facts`` condenses before
it returns, so it can be over only by the facts of extractions still in flight (each one adds what one model
answer extracted), or after ``max_condense_attempts`` condensations each lost to a concurrent change or
answered with no facts (then it stays over, with nothing lost, until the next put condenses: LlamaIndex's
block also keeps its facts when the condensing model returns none).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from typing import Any, cast

from llama_index.core.base.llms.types import ChatMessage, ContentBlock, TextBlock
from llama_index.core.bridge.pydantic import Field, TypeAdapter, field_validator
from llama_index.core.memory import Memory
from llama_index.core.memory.memory import BaseMemoryBlock
from llama_index.core.memory.memory_blocks import FactExtractionMemoryBlock, StaticMemoryBlock

from engram.history.blocks import BlockState, Condensed
from engram.history.store import HistoryStore
from engram.llama_index._runtime import StoreFields
from engram.llama_index.db_chat_store import ARCHIVED, EngramDBChatStore
from engram.llama_index.keys import session_id_for

log = logging.getLogger(__name__)

_CONTENT = TypeAdapter(list[ContentBlock])


def _format_facts(facts: Sequence[str]) -> str:
    """What LlamaIndex's block shows of its facts, to the model and in ``Memory.get()``."""
    return "\n".join(f"<fact>{fact}</fact>" for fact in facts)


class _DurableBlock(StoreFields):
    """The session a block call is about, and the Redis state of the block."""

    session_key: str | None = Field(
        default=None,
        description="LlamaIndex session key this block is bound to; None: the session of the Memory calling it",
    )

    @property
    def block_id(self) -> str:
        """The block's name as Redis stores it (names are free text; ids are session-id-like)."""
        return session_id_for(getattr(self, "name"))  # noqa: B009 - the LlamaIndex base class declares it

    def _state(self) -> BlockState:
        """The blocks' Redis state through the store of the running event loop."""
        store = self.runtime.current()
        return BlockState(store.client, store.keys)

    def _session(self, session_key: str | None) -> str:
        """The Engram session id of the session a call is about (Memory's ``session_id``, or the bound key)."""
        if self.session_key is not None and session_key is not None and session_key != self.session_key:
            raise ValueError(f"this block is bound to session {self.session_key!r}, not {session_key!r}")
        key = session_key if session_key is not None else self.session_key
        if key is None:
            raise ValueError("no session: use the block in a Memory, or pass session_key=")
        return session_id_for(key)

    @staticmethod
    def _session_of_put(messages: Sequence[ChatMessage]) -> str | None:
        """The session ``BaseMemoryBlock.aput`` stamped on the messages (Memory passes its session id)."""
        sessions = {m.additional_kwargs.get("session_id") for m in messages} - {None}
        if len(sessions) > 1:
            raise ValueError(f"messages of several sessions put at once: {sorted(map(str, sessions))}")
        return str(sessions.pop()) if sessions else None


class EngramFactExtractionMemoryBlock(_DurableBlock, FactExtractionMemoryBlock):
    """``FactExtractionMemoryBlock`` whose facts live in Redis per session, shared by every process."""

    max_condense_attempts: int = Field(
        default=3, ge=1, le=20, description="model calls one put may spend to condense the facts under max_facts"
    )

    @classmethod
    def class_name(cls) -> str:
        return "EngramFactExtractionMemoryBlock"

    @field_validator("facts")
    @classmethod
    def _no_facts_in_the_process(cls, facts: list[str]) -> list[str]:
        if facts:
            raise ValueError("facts live in Redis per session: add them with aadd_facts(facts, session_key=...)")
        return facts

    # --- the session's facts ----------------------------------------------------------------------------
    async def aget_facts(self, session_key: str | None = None) -> list[str]:
        """The session's facts, oldest first."""
        state = self._state()
        return [f.text for f in await state.facts(self.tenant, self._session(session_key), self.block_id, self.ttl)]

    def get_facts(self, session_key: str | None = None) -> list[str]:
        return self.runtime.call_sync(lambda _: self.aget_facts(session_key))

    async def aadd_facts(self, facts: Iterable[str], session_key: str | None = None) -> None:
        """Add facts to the session's (the ones not there yet), condensing with the model if over ``max_facts``."""
        await self._add(list(facts), self._session(session_key), [])

    def add_facts(self, facts: Iterable[str], session_key: str | None = None) -> None:
        self.runtime.call_sync(lambda _: self.aadd_facts(list(facts), session_key))

    async def aclear_facts(self, session_key: str | None = None) -> None:
        """Forget the session's facts (this block's only)."""
        state = self._state()
        await state.clear_facts(self.tenant, self._session(session_key), self.block_id)

    def clear_facts(self, session_key: str | None = None) -> None:
        self.runtime.call_sync(lambda _: self.aclear_facts(session_key))

    # --- LlamaIndex's block interface -------------------------------------------------------------------
    async def aput(
        self, messages: list[ChatMessage], from_short_term_memory: bool = False, session_id: str | None = None
    ) -> None:
        """As LlamaIndex's (the session id is stamped on the messages), with the session passed on explicitly;
        flushed by a :class:`DurableMemory`, it extracts from what the store really archived."""
        if from_short_term_memory and not self.accept_short_term_memory:
            return
        batches = ARCHIVED.get()
        if from_short_term_memory and batches:
            messages = batches[-1]
        if session_id is not None:
            for message in messages:
                message.additional_kwargs["session_id"] = session_id
        await self._extract(messages, self._session(session_id))

    async def _aget(self, messages: list[ChatMessage] | None = None, **block_kwargs: Any) -> str:
        return _format_facts(await self.aget_facts(block_kwargs.get("session_id")))

    async def _aput(self, messages: list[ChatMessage]) -> None:
        await self._extract(messages, self._session(self._session_of_put(messages)))

    async def _extract(self, messages: list[ChatMessage], session: str) -> None:
        """LlamaIndex's extraction, on the session's facts in Redis: read them for the prompt, ask the
        model, add what it found (nothing another replica added meanwhile is lost), condense if over."""
        if not messages:
            return
        state = self._state()
        existing = await state.facts(self.tenant, session, self.block_id, self.ttl)
        prompt = self.fact_extraction_prompt_template.format_messages(
            existing_facts=_format_facts([f.text for f in existing])
        )
        response = await self.llm.achat(messages=[*messages, *prompt])
        await self._add(self._parse_facts_xml(response.message.content or ""), session, messages)

    async def _add(self, facts: list[str], session: str, messages: Sequence[ChatMessage]) -> None:
        state = self._state()
        if await state.add_facts(self.tenant, session, self.block_id, facts, self.ttl) > self.max_facts:
            await self._condense(state, session, messages)

    async def _condense(self, state: BlockState, session: str, messages: Sequence[ChatMessage]) -> None:
        """Condense the session's facts to at most ``max_facts`` with the model, as LlamaIndex's block does,
        committed by compare-and-set; a lost race or an over-full result condenses again from what is there."""
        for _ in range(self.max_condense_attempts):
            read = await state.facts(self.tenant, session, self.block_id, self.ttl)
            if len(read) <= self.max_facts:
                return
            prompt = self.fact_condense_prompt_template.format_messages(
                existing_facts=_format_facts([f.text for f in read]), max_facts=self.max_facts
            )
            response = await self.llm.achat(messages=[*messages, *prompt])
            condensed = list(dict.fromkeys(self._parse_facts_xml(response.message.content or "")))
            if not condensed:
                return  # as LlamaIndex: an empty or unparsable answer must not wipe the facts
            if len(condensed) > self.max_facts:
                log.warning("the model condensed to %d facts, over max_facts=%d", len(condensed), self.max_facts)
                condensed = condensed[-self.max_facts :]
            outcome = await state.replace_facts(
                self.tenant, session, self.block_id, read, condensed, self.max_facts, self.ttl
            )
            if outcome is Condensed.REPLACED:
                return
        log.warning("facts of session %s stay over max_facts=%d for now", session, self.max_facts)


class EngramStaticMemoryBlock(_DurableBlock, StaticMemoryBlock):
    """``StaticMemoryBlock`` whose content is stored per session in Redis: set it from any process, every
    process reads it. ``static_content`` is what a session whose content was never set gets."""

    static_content: list[ContentBlock] = Field(
        default_factory=list, description="content of sessions whose content was never set"
    )

    @classmethod
    def class_name(cls) -> str:
        return "EngramStaticMemoryBlock"

    async def aget_content(self, session_key: str | None = None) -> list[ContentBlock]:
        """The session's content: the stored one, else ``static_content``."""
        state = self._state()
        stored = await state.state(self.tenant, self._session(session_key), self.block_id, self.ttl)
        return list(self.static_content) if stored is None else _CONTENT.validate_json(stored)

    def get_content(self, session_key: str | None = None) -> list[ContentBlock]:
        return self.runtime.call_sync(lambda _: self.aget_content(session_key))

    async def aset_content(self, content: str | Sequence[ContentBlock] | None, session_key: str | None = None) -> None:
        """Store the session's content (a string is one text block); None goes back to ``static_content``."""
        blocks: list[ContentBlock] | None = (
            [TextBlock(text=content)] if isinstance(content, str) else None if content is None else list(content)
        )
        state = self._state()
        value = None if blocks is None else _CONTENT.dump_json(blocks).decode()
        await state.set_state(self.tenant, self._session(session_key), self.block_id, value, self.ttl)

    def set_content(self, content: str | Sequence[ContentBlock] | None, session_key: str | None = None) -> None:
        self.runtime.call_sync(lambda _: self.aset_content(content, session_key))

    async def _aget(self, messages: list[ChatMessage] | None = None, **block_kwargs: Any) -> list[ContentBlock]:
        return await self.aget_content(block_kwargs.get("session_id"))


def _durable(block: BaseMemoryBlock[Any], chat_store: EngramDBChatStore) -> BaseMemoryBlock[Any]:
    """``block`` keeping its state where ``chat_store`` keeps the session's messages."""
    if isinstance(block, _DurableBlock):
        if (block.namespace, block.tenant) != (chat_store.namespace, chat_store.tenant):
            raise ValueError(f"memory block {block.name!r} is in another namespace or tenant than the memory")
        return block
    common = {
        "name": block.name,
        "description": block.description,
        "priority": block.priority,
        "accept_short_term_memory": block.accept_short_term_memory,
        "store": chat_store.runtime.home,  # the chat store's connection (and credentials)
        "namespace": chat_store.namespace,
        "tenant": chat_store.tenant,
        "ttl": chat_store.ttl,
    }
    if isinstance(block, FactExtractionMemoryBlock):
        if block.facts:
            raise ValueError(f"memory block {block.name!r} has facts in the process: add them with aadd_facts")
        return EngramFactExtractionMemoryBlock(
            **common,
            llm=block.llm,
            max_facts=block.max_facts,
            fact_extraction_prompt_template=block.fact_extraction_prompt_template,
            fact_condense_prompt_template=block.fact_condense_prompt_template,
        )
    if isinstance(block, StaticMemoryBlock):
        return EngramStaticMemoryBlock(**common, static_content=block.static_content)
    return block  # e.g. VectorMemoryBlock: its state is in the vector store it was given


class DurableMemory(Memory):
    """LlamaIndex's ``Memory`` whose durable fact blocks extract from the messages the store really archived.

    ``Memory`` reads the window, picks the oldest messages to flush, archives that many, and hands the
    blocks the messages it read. When two replicas flush one session at once, both read the same oldest
    messages and both archive as many: the store archives twice as many (atomically, none lost), but both
    replicas hand the blocks the first batch, so the second batch is never extracted. Here each flush hands
    the durable blocks the batch its own ``archive_oldest_messages`` call took (see ``ARCHIVED``): every
    archived message is extracted once. Other blocks (e.g. vector blocks) get what ``Memory`` gives them.
    """

    @classmethod
    def class_name(cls) -> str:
        return "EngramDurableMemory"

    async def _manage_queue(self) -> None:
        token = ARCHIVED.set([])
        try:
            await super()._manage_queue()
        finally:
            ARCHIVED.reset(token)


def durable_memory(
    session_key: str,
    *,
    redis_url: str | None = None,
    store: HistoryStore | None = None,
    chat_store: EngramDBChatStore | None = None,
    tenant: str = "default",
    namespace: str = "engram",
    ttl: int = 0,
    memory_blocks: Sequence[BaseMemoryBlock[Any]] = (),
    **memory_kwargs: Any,
) -> DurableMemory:
    """A LlamaIndex ``Memory`` for ``session_key`` whose messages and blocks' state live in Engram's Redis.

    Give the Redis as ``redis_url``, ``store`` (a :class:`HistoryStore`) or a ready ``chat_store``.
    ``FactExtractionMemoryBlock`` and ``StaticMemoryBlock`` among ``memory_blocks`` are replaced by their
    durable versions (same settings, state in Redis, on the chat store's connection); Engram blocks must be in
    the memory's namespace and tenant; other blocks are kept. ``memory_kwargs`` go to
    ``Memory.from_defaults`` (``token_limit``, ...).
    """
    if chat_store is None:
        connection: dict[str, Any] = {"store": store} if store is not None else {"redis_url": redis_url}
        chat_store = EngramDBChatStore(**connection, tenant=tenant, namespace=namespace, ttl=ttl)
    elif redis_url is not None or store is not None:
        raise TypeError("pass one of chat_store=, store= or redis_url=")
    memory = DurableMemory.from_defaults(  # cls(...): a DurableMemory, typed as Memory by LlamaIndex
        session_id=session_key,
        chat_store=chat_store,
        memory_blocks=[_durable(block, chat_store) for block in memory_blocks],
        **memory_kwargs,
    )
    return cast(DurableMemory, memory)
