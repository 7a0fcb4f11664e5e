"""``EngramMemory``: a drop-in for ``ChatMemoryBuffer`` whose history lives in Redis.

Per turn it costs two Redis round trips whatever the length of the conversation: one load of the
newest messages that fit the token limit (validated against this process's cache of the session's
tail) and one atomic commit of the user message with the reply. ``ChatMemoryBuffer`` over a chat
store instead reads the whole history and re-tokenizes it on every ``get``.

How it maps LlamaIndex's calls: ``put(user)`` holds the message; ``get()`` returns the window
``ChatMemoryBuffer`` would (same trimming rules) over the stored messages plus the held ones;
``put(assistant)`` commits everything held with it as one turn (adjacent, atomic, idempotent by
``turn_id``).

What is persisted before the answer arrives: nothing. Messages put without an answer (user, tool,
system) are held in this object only: another memory on the session, or this process after a crash,
does not see them, and a model error between question and answer leaves nothing written (a retry
does not store the question twice; a commit that fails keeps them held with the turn id, so putting
the answer again retries that turn). ``get``/``get_all``/pickling of this object include them
(``to_dict`` does not: it holds settings, not state); ``flush()`` / ``aflush()`` store them on their
own. This is the one deliberate difference from
``ChatMemoryBuffer``, which writes every ``put`` to its store at once.

Token counts: each message is counted once, when written, by ``tokenizer_fn`` when one is given (else
by the store's tokenizer: tiktoken ``cl100k_base``, ``ChatMemoryBuffer``'s default too); the window sums
the per-message counts, where ``ChatMemoryBuffer`` counts the contents joined by spaces (the same for
whitespace tokenizers, within a token per message for BPE ones).

Rolling summary (``summarize=True``): the window's budget is ``token_limit`` less the summary's share
(``summary_max_tokens``, at most half), the same load returns the session's summary, and ``get()`` opens
with it as a system message (its tokens count against the limit). What falls out of the window is folded
in by ``summary_llm`` (any LlamaIndex LLM; without one, Engram's deterministic echo extract): after a
commit whose load found a batch (``summary_batch``) out of the window, on Engram's background loop
thread, never on the caller's path (``summarizing`` is the future of that run); or now, with
``asummarize()`` / ``summarize_now()``. Replicas and memories racing on one session are kept apart by
compare-and-set in Redis (see :mod:`engram.history.summary`).

Keys: ``session_id`` (or ``chat_store_key``) is any non-empty string (see :mod:`engram.llama_index.keys`).
Serializable: ``to_dict``/``from_dict``/``model_validate``/pickle; a copy reconnects by ``redis_url``.
Build one memory per request (they are cheap); share the :class:`HistoryStore` (and its cache).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import pickle
import threading
import uuid
from collections.abc import Callable, Sequence
from typing import Any

from llama_index.core.base.llms.types import ChatMessage, MessageRole
from llama_index.core.bridge.pydantic import Field, PrivateAttr
from llama_index.core.llms.llm import LLM
from llama_index.core.memory.types import DEFAULT_CHAT_STORE_KEY, BaseMemory
from llama_index.core.storage.chat_store.base import BaseChatStore
from llama_index.core.utils import get_tokenizer

from engram.echo import echo_summary
from engram.history.store import HistoryStore
from engram.history.summary import (
    DEFAULT_SUMMARY_BATCH,
    DEFAULT_SUMMARY_MAX_TOKENS,
    Advance,
    Summarize,
    SummaryBudget,
    advance_summary,
    summary_prompt_text,
)
from engram.llama_index._runtime import Operation, Reconnecting, StoreRuntime, background_loop
from engram.llama_index.chat_store import RedisChatStore
from engram.llama_index.convert import to_chat_message, to_new_message
from engram.llama_index.keys import label_for, session_id_for
from engram.messages import CommittedTurn, NewMessage, StoredMessage, Window
from engram.policy import MAX_MESSAGES_PER_SESSION, SESSION_TTL_SECONDS, TOKEN_LIMIT, Policy

_ANSWER_ROLES = frozenset({"assistant", "model", "chatbot"})
# ChatMemoryBuffer's rule: a window (shorter than the whole history) opens with neither of these.
_NOT_OPENING_ROLES = frozenset({"assistant", "tool"})
DEFAULT_TOKEN_LIMIT_RATIO = 0.75  # ChatMemoryBuffer's share of the LLM's context window
SUMMARIZE_PROMPT = (
    "You keep a running summary of a conversation between a user and an assistant. Fold the new messages "
    "into the summary: keep facts, names, decisions, open questions and the user's preferences; drop "
    "pleasantries. Answer with the updated summary only, in at most {max_tokens} tokens."
)
log = logging.getLogger("engram.llama_index")
# Sessions whose summary a memory of this process is advancing in the background (one run each).
_summarizing: set[tuple[str, str, str]] = set()
_summarizing_lock = threading.Lock()


def llm_summarizer(llm: LLM) -> Summarize:
    """A summarizer asking ``llm`` to fold new messages into the summary."""

    async def summarize(previous: str, messages: Sequence[StoredMessage], max_tokens: int) -> str:
        new = "\n".join(f"{m.role}: {m.content}" for m in messages)
        prompt = [
            ChatMessage(role=MessageRole.SYSTEM, content=SUMMARIZE_PROMPT.format(max_tokens=max_tokens)),
            ChatMessage(
                role=MessageRole.USER, content=f"Summary so far:\n{previous or '(none)'}\n\nNew messages:\n{new}"
            ),
        ]
        response = await llm.achat(prompt)
        return (response.message.content or "").strip()

    return summarize


async def echo_summarizer(previous: str, messages: Sequence[StoredMessage], max_tokens: int) -> str:
    """Engram's deterministic extract (no model): which messages are covered, by id."""
    from engram.tokens import default_tokenizer

    return echo_summary(previous, messages, max_tokens, default_tokenizer())


def buffer_window(
    messages: Sequence[ChatMessage], tokens: Sequence[int], token_limit: int, whole_history: bool
) -> list[ChatMessage]:
    """What ``ChatMemoryBuffer.get`` returns for ``messages`` (the newest part of the history; all of it
    when ``whole_history``): the longest suffix that fits and does not open with an assistant or tool
    message (the whole history may), else the newest message alone, even over the limit."""
    count = len(messages)
    suffix_tokens = [0] * (count + 1)  # suffix_tokens[k]: tokens of the newest k messages
    for k in range(1, count + 1):
        suffix_tokens[k] = suffix_tokens[k - 1] + tokens[count - k]
    for k in range(count, 0, -1):
        may_open = k == 1 or (whole_history and k == count) or messages[count - k].role not in _NOT_OPENING_ROLES
        if may_open and suffix_tokens[k] <= token_limit:
            return list(messages[count - k :])
    return list(messages[-1:])


class EngramMemory(Reconnecting, BaseMemory):
    """Chat memory for ``SimpleChatEngine``, ``CondensePlusContextChatEngine`` and friends."""

    redis_url: str = Field(description="Redis URL the memory (re)connects to")
    namespace: str = Field(default="engram", description="Engram key namespace")
    tenant: str = Field(default="default", description="tenant (DNS label) owning the session")
    session_id: str = Field(
        default=DEFAULT_CHAT_STORE_KEY, min_length=1, description="the conversation's key, any non-empty string"
    )
    token_limit: int = Field(
        default=TOKEN_LIMIT.default, ge=1, le=TOKEN_LIMIT.maximum, description="tokens of history handed to the model"
    )
    session_ttl_seconds: int = Field(
        default=SESSION_TTL_SECONDS.default,
        ge=SESSION_TTL_SECONDS.minimum,
        le=SESSION_TTL_SECONDS.maximum,
        description="0 = never expire",
    )
    max_messages_per_session: int = Field(
        default=MAX_MESSAGES_PER_SESSION.default,
        ge=MAX_MESSAGES_PER_SESSION.minimum,
        le=MAX_MESSAGES_PER_SESSION.maximum,
        description="oldest trimmed",
    )
    turn_id: str | None = Field(default=None, description="id of the next commit (idempotency); random if unset")
    tokenizer_fn: Callable[[str], list[Any]] = Field(
        default_factory=get_tokenizer, exclude=True, description="counts the tokens of what this memory writes"
    )
    summarize: bool = Field(default=False, description="keep a rolling summary of what falls out of the window")
    summary_max_tokens: int = Field(
        default=DEFAULT_SUMMARY_MAX_TOKENS, ge=16, description="the summary's share of token_limit (at most half)"
    )
    summary_batch: int = Field(
        default=DEFAULT_SUMMARY_BATCH, ge=1, description="messages out of the window that start a summarizer"
    )
    summary_llm: LLM | None = Field(
        default=None, exclude=True, description="summarizes (None: Engram's deterministic extract)"
    )

    _runtime: StoreRuntime | None = PrivateAttr(default=None)
    _policy: Policy = PrivateAttr(default_factory=Policy)
    _window: Window | None = PrivateAttr(default=None)
    # put() but not yet committed: each message with its prepared form (validated, tokens counted once)
    _pending: list[tuple[ChatMessage, NewMessage]] = PrivateAttr(default_factory=list)
    _committed: CommittedTurn | None = PrivateAttr(default=None)
    _summarizing: concurrent.futures.Future[Advance] | None = PrivateAttr(default=None)

    def __init__(self, *, store: HistoryStore | None = None, policy: Policy | None = None, **data: Any) -> None:
        if policy is not None:  # the policy's fields, so that to_dict/from_dict keep them too
            data.setdefault("token_limit", policy.token_limit)
            data.setdefault("session_ttl_seconds", policy.session_ttl_seconds)
            data.setdefault("max_messages_per_session", policy.max_messages_per_session)
        unknown = set(data) - set(type(self).model_fields) - {"class_name"}
        if unknown:
            raise TypeError(f"EngramMemory got unexpected arguments: {', '.join(sorted(unknown))}")
        super().__init__(**self._connection_fields(store, data))
        if store is not None:
            self._runtime = StoreRuntime(store)

    def model_post_init(self, context: Any, /) -> None:
        super().model_post_init(context)
        # the store's policy bounds token_limit from 16; a smaller buffer only trims harder
        self._policy = Policy(
            token_limit=max(self.token_limit, TOKEN_LIMIT.minimum),
            session_ttl_seconds=self.session_ttl_seconds,
            max_messages_per_session=self.max_messages_per_session,
        )

    @classmethod
    def class_name(cls) -> str:
        return "EngramMemory"

    @classmethod
    def from_defaults(
        cls,
        chat_history: list[ChatMessage] | None = None,
        llm: LLM | None = None,
        chat_store: BaseChatStore | None = None,
        chat_store_key: str | None = None,
        token_limit: int | None = None,
        tokenizer_fn: Callable[[str], list[Any]] | None = None,
        **kwargs: Any,
    ) -> EngramMemory:
        """``ChatMemoryBuffer.from_defaults``'s arguments, plus Engram's: ``store=`` or ``redis_url=``
        (or ``chat_store=`` a :class:`RedisChatStore`), ``session_id`` (= ``chat_store_key``),
        ``tenant``, ``policy``, ``turn_id``. ``chat_history`` replaces what the session holds, as
        ``ChatMemoryBuffer`` sets it in its store. Any other argument is a TypeError."""
        if chat_store is not None:
            if not isinstance(chat_store, RedisChatStore):
                raise TypeError(
                    f"chat_store: EngramMemory keeps its history in Engram's Redis; pass store=, redis_url= or "
                    f"an engram RedisChatStore, not {type(chat_store).__name__}"
                )
            if "store" not in kwargs and "redis_url" not in kwargs:
                kwargs["store"] = chat_store.runtime.home
            kwargs.setdefault("tenant", chat_store.tenant)
            if "policy" not in kwargs:  # the chat store's retention applies to what the memory writes
                kwargs.setdefault("session_ttl_seconds", chat_store.ttl)
                kwargs.setdefault("max_messages_per_session", chat_store.max_messages)
        if chat_store_key is not None:
            if kwargs.get("session_id", chat_store_key) != chat_store_key:
                raise TypeError("chat_store_key and session_id name the same thing: pass one of them")
            kwargs["session_id"] = chat_store_key
        if llm is not None and token_limit is None:
            window = int(llm.metadata.context_window * DEFAULT_TOKEN_LIMIT_RATIO)
            token_limit = min(window, TOKEN_LIMIT.maximum)
        if token_limit is not None:
            kwargs["token_limit"] = token_limit
        if tokenizer_fn is not None:
            kwargs["tokenizer_fn"] = tokenizer_fn
        memory = cls(**kwargs)
        if chat_history is not None:
            memory.set(chat_history)
        return memory

    # --- what the service reads after a turn ----------------------------------------------------------
    @property
    def chat_store_key(self) -> str:
        """``ChatMemoryBuffer``'s name for the conversation's key."""
        return self.session_id

    @property
    def window(self) -> Window | None:
        """The window loaded for this turn (its ``outcome`` is hit / delta / miss)."""
        return self._window

    @property
    def committed(self) -> CommittedTurn | None:
        """What the last commit stored (``duplicate`` when another request committed this turn first)."""
        return self._committed

    @property
    def _session(self) -> str:
        return session_id_for(self.session_id)

    def _new(self, message: ChatMessage) -> NewMessage:
        """``message`` as stored, counted by ``tokenizer_fn`` when one was given."""
        new = to_new_message(message)
        if "tokenizer_fn" in self.model_fields_set:
            new = NewMessage(new.role, new.content, new.extra, len(self.tokenizer_fn(new.content)))
        return self.runtime.home.prepare(new)

    # --- operations: each defined once, run on the caller's loop (a-methods) or the sync bridge ---------
    def _load(self) -> Operation[Window]:
        async def operation(store: HistoryStore) -> Window:
            if self.summarize:
                self._window = await store.load_window(
                    self.tenant,
                    self._session,
                    self._summary_budget.window_tokens,
                    turn_id=self.turn_id,
                    summary_batch=self.summary_batch,
                )
            else:
                self._window = await store.load_window(
                    self.tenant, self._session, self.token_limit, turn_id=self.turn_id
                )
            return self._window

        return operation

    # --- rolling summary ----------------------------------------------------------------------------
    @property
    def _summary_budget(self) -> SummaryBudget:
        return SummaryBudget.of(self.token_limit, self.summary_max_tokens)

    def _summarizer(self) -> Summarize:
        return llm_summarizer(self.summary_llm) if self.summary_llm is not None else echo_summarizer

    def _advance(self, before: str | None) -> Operation[Advance]:
        summarize, budget = self._summarizer(), self._summary_budget
        return lambda store: advance_summary(store, self.tenant, self._session, summarize, budget, before=before)

    async def asummarize(self) -> Advance:
        """Fold everything that has fallen out of the window into the summary now (on the caller's loop)."""
        return await self.runtime.call(self._advance(None))

    def summarize_now(self) -> Advance:
        return self.runtime.call_sync(self._advance(None))

    @property
    def summarizing(self) -> concurrent.futures.Future[Advance] | None:
        """The background summary run this memory started last (None if none): ``.result()`` waits for it."""
        return self._summarizing

    def _summarize_in_background(self, window: Window | None) -> None:
        """After a commit: when its load found a batch out of the window, advance the summary on Engram's
        background loop (one run per session per process); the caller does not wait."""
        summary = window.summary if window is not None else None
        if window is None or summary is None or not summary.due or not window.messages:
            return
        key = (self.runtime.home.keys.namespace, self.tenant, self._session)
        with _summarizing_lock:
            if key in _summarizing:
                return
            _summarizing.add(key)
        operation, runtime = self._advance(window.messages[0].id), self.runtime

        async def run() -> Advance:
            try:
                return await runtime.call(operation)
            except Exception as error:  # never reaches the caller: logged; a later commit retries
                log.warning("rolling summary of %s failed: %s: %s", key[2], type(error).__name__, error)
                return Advance("nothing")
            finally:
                with _summarizing_lock:
                    _summarizing.discard(key)

        self._summarizing = asyncio.run_coroutine_threadsafe(run(), background_loop())

    def _newest(self) -> Operation[list[StoredMessage]]:
        return lambda store: store.last_messages(self.tenant, self._session, 1)

    def _stored(self) -> Operation[list[ChatMessage]]:
        async def operation(store: HistoryStore) -> list[ChatMessage]:
            stored = await store.all_messages(self.tenant, self._session)
            return [to_chat_message(m) for m in stored] + [chat for chat, _ in self._pending]

        return operation

    def _commit(self, new: list[NewMessage], turn_id: str | None) -> Operation[None]:
        async def operation(store: HistoryStore) -> None:
            self._committed = await store.append(
                self.tenant, self._session, new, self._policy, turn_id=turn_id, label=label_for(self.session_id)
            )
            # only now: a commit that failed keeps its messages held and its turn id for the retry
            self._pending = []
            if self.summarize:
                self._summarize_in_background(self._window)
            self._window = None  # the next get loads again (a hit or delta, from the cache)
            self.turn_id = None

        return operation

    def _replace(self, messages: list[ChatMessage]) -> Operation[None]:
        new = [self._new(m) for m in messages]

        async def operation(store: HistoryStore) -> None:
            if new:
                await store.replace(self.tenant, self._session, new, self._policy, label=label_for(self.session_id))
            else:
                await store.delete_session(self.tenant, self._session)
            self._pending, self._window = [], None

        return operation

    # --- loading ------------------------------------------------------------------------------------
    async def aload(self) -> Window:
        """Load this turn's window now (one round trip). With ``turn_id`` set, ``window.replay`` holds
        that turn if it was already committed: answer the retry from it without calling the model."""
        return await self.runtime.call(self._load())

    def load(self) -> Window:
        return self.runtime.call_sync(self._load())

    def _needs_newest(self, window: Window) -> bool:
        """Nothing fit and nothing is held: ``ChatMemoryBuffer`` would return the newest message anyway."""
        return not window.fitted and not window.reaches_start and not self._pending

    def _compose(self, window: Window, initial_token_count: int, newest: list[StoredMessage]) -> list[ChatMessage]:
        if initial_token_count > self.token_limit:
            raise ValueError("Initial token count exceeds token limit")  # as ChatMemoryBuffer
        stored = list(window.fitted) or newest
        messages = [to_chat_message(m) for m in stored] + [chat for chat, _ in self._pending]
        tokens = [m.tokens for m in stored] + [new.tokens or 0 for _, new in self._pending]
        whole = window.reaches_start and not newest
        summary = summary_prompt_text(window.summary) if window.summary is not None else ""
        if not summary:
            return buffer_window(messages, tokens, self.token_limit - initial_token_count, whole)
        # the summary opens the window and its tokens count against the limit
        summary_tokens = len(self.tokenizer_fn(summary))
        budget = max(0, self.token_limit - initial_token_count - summary_tokens)
        opening = ChatMessage(role=MessageRole.SYSTEM, content=summary)
        return [opening, *buffer_window(messages, tokens, budget, whole)]

    async def aget(self, input: str | None = None, **kwargs: Any) -> list[ChatMessage]:
        window = self._window if self._window is not None else await self.aload()
        newest = await self.runtime.call(self._newest()) if self._needs_newest(window) else []
        return self._compose(window, int(kwargs.get("initial_token_count", 0)), newest)

    def get(self, input: str | None = None, **kwargs: Any) -> list[ChatMessage]:
        window = self._window if self._window is not None else self.load()
        newest = self.runtime.call_sync(self._newest()) if self._needs_newest(window) else []
        return self._compose(window, int(kwargs.get("initial_token_count", 0)), newest)

    async def aget_all(self) -> list[ChatMessage]:
        return await self.runtime.call(self._stored())

    def get_all(self) -> list[ChatMessage]:
        return self.runtime.call_sync(self._stored())

    # --- writing ------------------------------------------------------------------------------------
    def _take_turn(self, message: ChatMessage) -> list[NewMessage] | None:
        """Hold ``message``; return everything held when it completes a turn (an answer). The turn id is
        fixed here and everything stays held until the commit succeeds: after an error (e.g.
        ``OutcomeUnknown``) putting the answer again retries the same turn, stored once."""
        new = self._new(message)
        if new.role not in _ANSWER_ROLES:
            self._pending.append((message, new))
            return None
        self.turn_id = self.turn_id or uuid.uuid4().hex
        return [held for _, held in self._pending] + [new]

    async def aput(self, message: ChatMessage) -> None:
        if turn := self._take_turn(message):
            await self.runtime.call(self._commit(turn, self.turn_id))

    def put(self, message: ChatMessage) -> None:
        if turn := self._take_turn(message):
            self.runtime.call_sync(self._commit(turn, self.turn_id))

    def _flush(self) -> Operation[None] | None:
        if not self._pending:
            return None
        return self._commit([new for _, new in self._pending], None)

    async def aflush(self) -> None:
        """Store held messages that no answer followed (e.g. a user message on its own)."""
        if operation := self._flush():
            await self.runtime.call(operation)

    def flush(self) -> None:
        if operation := self._flush():
            self.runtime.call_sync(operation)

    async def aset(self, messages: list[ChatMessage]) -> None:
        await self.runtime.call(self._replace(messages))

    def set(self, messages: list[ChatMessage]) -> None:
        self.runtime.call_sync(self._replace(messages))

    async def areset(self) -> None:
        await self.runtime.call(self._replace([]))

    def reset(self) -> None:
        self.runtime.call_sync(self._replace([]))

    # --- serialization ------------------------------------------------------------------------------
    def to_string(self) -> str:
        return self.model_dump_json()

    @classmethod
    def from_string(cls, json_str: str) -> EngramMemory:
        return cls.model_validate_json(json_str)

    def _unpicklable(self) -> dict[str, Any]:
        return {"_runtime": None, "_window": None, "_summarizing": None}

    def __getstate__(self) -> dict[str, Any]:
        state = super().__getstate__()
        try:
            pickle.dumps(self.tokenizer_fn)
        except Exception:  # a lambda, a closure: the copy counts with the store's tokenizer instead
            state["__dict__"].pop("tokenizer_fn", None)
            state["__pydantic_fields_set__"] = state["__pydantic_fields_set__"] - {"tokenizer_fn"}
        try:
            pickle.dumps(self.summary_llm)
        except Exception:  # an LLM holding a client: the copy summarizes with the extract until given one
            state["__dict__"]["summary_llm"] = None
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        if "tokenizer_fn" not in self.__dict__:
            self.__dict__["tokenizer_fn"] = get_tokenizer()
