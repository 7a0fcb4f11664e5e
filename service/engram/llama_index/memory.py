"""``EngramMemory``: a drop-in for ``ChatMemoryBuffer`` whose history lives in Redis.

Per turn it costs two Redis round trips whatever the length of the conversation: one load of the
newest messages that fit the token limit (validated against this process's cache of the session's
tail) and one atomic commit of the user message with the reply. ``ChatMemoryBuffer`` over a chat
store instead reads the whole history and re-tokenizes it on every ``get``.

How it maps LlamaIndex's calls: ``put(user)`` keeps the message pending; ``get()`` returns the stored
window plus the pending messages; ``put(assistant)`` commits everything pending with it as one turn
(adjacent, atomic, idempotent by ``turn_id``). A model error between the two leaves nothing written.
Build one memory per request (they are cheap); share the :class:`HistoryStore` (and its cache).
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from typing import Any

from llama_index.core.base.llms.types import ChatMessage
from llama_index.core.bridge.pydantic import Field, PrivateAttr
from llama_index.core.memory.types import BaseMemory
from llama_index.core.utils import get_tokenizer

from engram.history.cache import drop_unanswerable_start, fit_budget
from engram.history.store import HistoryStore
from engram.llama_index._runtime import Operation, StoreRuntime
from engram.llama_index.convert import to_chat_message, to_new_message
from engram.messages import CommittedTurn, NewMessage, StoredMessage, Window
from engram.policy import TOKEN_LIMIT, Policy

_ANSWER_ROLES = frozenset({"assistant", "model", "chatbot"})


class EngramMemory(BaseMemory):
    """Chat memory for ``SimpleChatEngine``, ``CondensePlusContextChatEngine`` and friends."""

    tenant: str = Field(default="default", description="tenant (DNS label) owning the session")
    session_id: str = Field(description="stable id of the conversation; the same on every replica")
    token_limit: int = Field(
        default=TOKEN_LIMIT.default,
        ge=TOKEN_LIMIT.minimum,
        le=TOKEN_LIMIT.maximum,
        description="tokens of history handed to the model",
    )
    turn_id: str | None = Field(default=None, description="id of the next commit (idempotency); random if unset")
    tokenizer_fn: Callable[[str], list[Any]] = Field(
        default_factory=get_tokenizer, exclude=True, description="used by chat engines for prefix messages"
    )

    _runtime: StoreRuntime = PrivateAttr()
    _policy: Policy = PrivateAttr()
    _window: Window | None = PrivateAttr(default=None)
    # put() but not yet committed: each message with its prepared form (validated, tokens counted once)
    _pending: list[tuple[ChatMessage, NewMessage]] = PrivateAttr(default_factory=list)
    _committed: CommittedTurn | None = PrivateAttr(default=None)

    def __init__(self, *, store: HistoryStore, policy: Policy | None = None, **data: Any) -> None:
        if "token_limit" not in data and policy is not None:
            data["token_limit"] = policy.token_limit
        super().__init__(**data)
        self._runtime = StoreRuntime(store)
        self._policy = policy or Policy(token_limit=self.token_limit)

    @classmethod
    def class_name(cls) -> str:
        return "EngramMemory"

    @classmethod
    def from_defaults(cls, **kwargs: Any) -> EngramMemory:
        """``EngramMemory.from_defaults(store=..., session_id=..., token_limit=...)``."""
        return cls(**kwargs)

    # --- what the service reads after a turn ----------------------------------------------------------
    @property
    def window(self) -> Window | None:
        """The window loaded for this turn (its ``outcome`` is hit / delta / miss)."""
        return self._window

    @property
    def committed(self) -> CommittedTurn | None:
        """What the last commit stored (``duplicate`` when another request committed this turn first)."""
        return self._committed

    # --- operations: each defined once, run on the caller's loop (a-methods) or the sync bridge ---------
    def _load(self) -> Operation[Window]:
        async def operation(store: HistoryStore) -> Window:
            self._window = await store.load_window(self.tenant, self.session_id, self.token_limit, turn_id=self.turn_id)
            return self._window

        return operation

    def _stored(self) -> Operation[list[ChatMessage]]:
        async def operation(store: HistoryStore) -> list[ChatMessage]:
            stored = await store.all_messages(self.tenant, self.session_id)
            return [to_chat_message(m) for m in stored] + [chat for chat, _ in self._pending]

        return operation

    def _commit(self, new: list[NewMessage], turn_id: str | None) -> Operation[None]:
        async def operation(store: HistoryStore) -> None:
            self._committed = await store.append(self.tenant, self.session_id, new, self._policy, turn_id=turn_id)
            self._window = None  # the next get loads again (a hit or delta, from the cache)
            self.turn_id = None

        return operation

    def _replace(self, messages: list[ChatMessage]) -> Operation[None]:
        new = [to_new_message(m) for m in messages]

        async def operation(store: HistoryStore) -> None:
            if new:
                await store.replace(self.tenant, self.session_id, new, self._policy)
            else:
                await store.delete_session(self.tenant, self.session_id)
            self._pending, self._window = [], None

        return operation

    # --- loading ------------------------------------------------------------------------------------
    async def aload(self) -> Window:
        """Load this turn's window now (one round trip). With ``turn_id`` set, ``window.replay`` holds
        that turn if it was already committed: answer the retry from it without calling the model."""
        return await self._runtime.call(self._load())

    def load(self) -> Window:
        return self._runtime.call_sync(self._load())

    def _compose(self, window: Window, initial_token_count: int) -> list[ChatMessage]:
        pending_tokens = sum(new.tokens or 0 for _, new in self._pending)
        budget = self.token_limit - initial_token_count - pending_tokens
        if budget < 0:
            raise ValueError(
                f"initial token count {initial_token_count + pending_tokens} exceeds token limit {self.token_limit}"
            )
        history: list[StoredMessage] = drop_unanswerable_start(fit_budget(window.messages, budget))
        return [to_chat_message(m) for m in history] + [chat for chat, _ in self._pending]

    async def aget(self, input: str | None = None, **kwargs: Any) -> list[ChatMessage]:
        window = self._window if self._window is not None else await self.aload()
        return self._compose(window, int(kwargs.get("initial_token_count", 0)))

    def get(self, input: str | None = None, **kwargs: Any) -> list[ChatMessage]:
        window = self._window if self._window is not None else self.load()
        return self._compose(window, int(kwargs.get("initial_token_count", 0)))

    async def aget_all(self) -> list[ChatMessage]:
        return await self._runtime.call(self._stored())

    def get_all(self) -> list[ChatMessage]:
        return self._runtime.call_sync(self._stored())

    # --- writing ------------------------------------------------------------------------------------
    def _take_turn(self, message: ChatMessage) -> list[NewMessage] | None:
        """Add ``message`` to the pending turn; return the turn when it is complete (an answer)."""
        new = self._runtime.home.prepare(to_new_message(message))
        self._pending.append((message, new))
        if new.role not in _ANSWER_ROLES:
            return None
        turn, self._pending = self._pending, []
        return [new for _, new in turn]

    async def aput(self, message: ChatMessage) -> None:
        if turn := self._take_turn(message):
            await self._runtime.call(self._commit(turn, self.turn_id or uuid.uuid4().hex))

    def put(self, message: ChatMessage) -> None:
        if turn := self._take_turn(message):
            self._runtime.call_sync(self._commit(turn, self.turn_id or uuid.uuid4().hex))

    async def aflush(self) -> None:
        """Commit pending messages that no answer followed (e.g. a user message on its own)."""
        if self._pending:
            pending, self._pending = self._pending, []
            await self._runtime.call(self._commit([new for _, new in pending], None))

    async def aset(self, messages: list[ChatMessage]) -> None:
        await self._runtime.call(self._replace(messages))

    def set(self, messages: list[ChatMessage]) -> None:
        self._runtime.call_sync(self._replace(messages))

    async def areset(self) -> None:
        await self._runtime.call(self._replace([]))

    def reset(self) -> None:
        self._runtime.call_sync(self._replace([]))
