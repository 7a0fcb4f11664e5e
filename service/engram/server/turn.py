"""One chat turn, as a pipeline read from top to bottom.

    authenticate  the route's dependency: the API key names the tenant and its policy (deps.py)
    validate      validate(): what can be checked without Redis; the user message counted once
    load          load(): the session's window, one Redis round trip (and a retry's stored turn)
    model         start_model(): the window that fits the token limit, then the new message, streamed
    commit        commit(): the user message and the reply, one atomic, idempotent round trip
    metrics       load, model and commit each timed (engram_turn_step_duration_seconds{step}); the
                  turn's outcome counted once, when it ends (engram_turns_total{outcome})

Every turn streams: a JSON answer is the stream collected (:meth:`Turn.collect`). Nothing about a
conversation stays in the process between requests (the store's tail cache is validated on every
load), so any replica serves any turn. The memory is a :class:`TurnMemory`: the session's history in
Redis, or with ``ENGRAM_MEMORY=off`` (a benchmark baseline, not a mode to serve users with) a
:class:`NullMemory` that loads and stores nothing; the pipeline is the same.

A retry with a committed turn id is answered from the stored turn (load finds it; the model is not
called); a retry racing the first request is answered with what the first stored (commit finds it).
A model failure commits nothing (502). Redis trouble before the commit commits nothing (503
``store_unavailable``; 507 ``store_full``, found by the load, before the model runs); a commit that got
no answer is 503 ``outcome_unknown`` with the turn id to retry with.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import AsyncGenerator, AsyncIterator
from dataclasses import dataclass
from typing import Protocol

from engram.connections import primary_address
from engram.echo import Message
from engram.errors import (
    EngramError,
    InvalidInput,
    MessageTooLarge,
    QuotaExceeded,
    RateLimited,
    StoreFull,
    StoreUnavailable,
)
from engram.history.cache import drop_unanswerable_start, fit_budget
from engram.history.store import HistoryStore, validate_turn_id
from engram.history.summary import summary_prompt_text
from engram.messages import CommittedTurn, HistoryOutcome, NewMessage, StoredMessage, Window, stream_id_key
from engram.policy import Tenant
from engram.redis_keys import validate_session_id, validate_subject_id
from engram.server import metrics
from engram.server.errors import ModelFailed, TurnIdReused, redact, summarize_model_error
from engram.server.model import NO_OPTIONS, ChatModel, ModelOptions, PromptMessage

log = logging.getLogger("engram.server")


# --- what a turn is given ---------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class TurnRequest:
    """One new user message for a session; ``turn_id`` makes retries safe (generated when absent).
    ``prefix`` goes before the history in the prompt and is never stored (a request's system messages,
    or the whole conversation of a client that keeps its own); ``options`` are passed to the model.
    ``subject`` (an end user's id) links the session to it, for erasure by subject."""

    session_id: str
    message: str
    turn_id: str | None = None
    prefix: tuple[PromptMessage, ...] = ()
    options: ModelOptions = NO_OPTIONS
    subject: str | None = None


class TurnMemory(Protocol):
    """Where a turn's history comes from and goes to."""

    async def load(self, session_id: str, token_limit: int, turn_id: str) -> Window: ...

    async def commit(
        self, session_id: str, turn_id: str, user: NewMessage, reply: NewMessage, subject: str | None
    ) -> CommittedTurn: ...


@dataclass(frozen=True, slots=True)
class SessionMemory:
    """The session's history in Redis: one round trip to load (it also counts the tenant's request rate),
    one to commit (it also checks the tenant's quotas)."""

    store: HistoryStore
    tenant: Tenant

    async def load(self, session_id: str, token_limit: int, turn_id: str) -> Window:
        policy = self.tenant.policy
        return await self.store.load_window(self.tenant.name, session_id, token_limit, turn_id=turn_id, policy=policy)

    async def commit(
        self, session_id: str, turn_id: str, user: NewMessage, reply: NewMessage, subject: str | None
    ) -> CommittedTurn:
        name, policy = self.tenant.name, self.tenant.policy
        return await self.store.commit_turn(name, session_id, turn_id, user, reply, policy, subject=subject)


class NullMemory:
    """ENGRAM_MEMORY=off: nothing loaded, nothing stored; the model is given only the new message."""

    async def load(self, session_id: str, token_limit: int, turn_id: str) -> Window:
        return Window([], "off", 0)

    async def commit(
        self, session_id: str, turn_id: str, user: NewMessage, reply: NewMessage, subject: str | None
    ) -> CommittedTurn:
        kept = [StoredMessage(f"0-{i}", m.role, m.content, m.tokens or 0, turn_id) for i, m in enumerate((user, reply))]
        return CommittedTurn(turn_id, kept)


@dataclass(frozen=True, slots=True)
class TurnContext:
    """What a turn needs besides the request: shared per process, except the tenant and its memory."""

    store: HistoryStore  # its rules validate messages and its tokenizer counts them, whatever the memory
    memory: TurnMemory
    model: ChatModel
    tenant: Tenant
    served_by: str


@dataclass(frozen=True, slots=True)
class TurnResult:
    session_id: str
    turn_id: str
    reply: str
    served_by: str
    redis_node: str | None  # host:port of the Redis primary that holds the session (None: memory off)
    cache: HistoryOutcome
    messages: int  # earlier messages of the session the model was given the window of
    prompt_tokens: int  # what the model was given, counted as Engram stores tokens (cl100k_base)
    reply_tokens: int


# --- the steps --------------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class ValidTurn:
    session_id: str
    turn_id: str
    user: NewMessage  # validated, tokens counted
    prefix: tuple[PromptMessage, ...]
    prefix_tokens: int
    options: ModelOptions
    subject: str | None


def validate(ctx: TurnContext, request: TurnRequest) -> ValidTurn:
    """Everything that can be checked without Redis. The message must fit the byte limit and the
    tenant's token limit (the model is given the message plus the history that fits that limit)."""
    session_id = validate_session_id(request.session_id)
    turn_id = validate_turn_id(request.turn_id) if request.turn_id is not None else uuid.uuid4().hex
    user = ctx.store.prepare(NewMessage("user", request.message))
    token_limit = ctx.tenant.policy.token_limit
    if (user.tokens or 0) > token_limit:
        raise MessageTooLarge(f"message of {user.tokens} tokens is over the token limit of {token_limit}")
    prefix = request.prefix
    for message in prefix:
        ctx.store.validate(NewMessage(message.role, message.content))
    prefix_tokens = sum(ctx.store.count_tokens(m.content) for m in prefix)
    subject = validate_subject_id(request.subject) if request.subject is not None else None
    return ValidTurn(session_id, turn_id, user, prefix, prefix_tokens, request.options, subject)


async def load(ctx: TurnContext, turn: ValidTurn) -> Window:
    """Round trip 1: the window (and, for a retry, the stored turn, which must be of the same message)."""
    started = time.perf_counter()
    with metrics.redis_operation("load"):
        window = await ctx.memory.load(turn.session_id, ctx.tenant.policy.token_limit, turn.turn_id)
    metrics.observe_load(window, time.perf_counter() - started)
    if window.replay is not None:
        _check_same_message(window.replay, turn)
    return window


@dataclass(frozen=True, slots=True)
class Prompt:
    messages: list[Message]
    tokens: int


def prompt(ctx: TurnContext, window: Window, turn: ValidTurn) -> Prompt:
    """What the model is given: the request's prefix, the rolling summary (summary mode; its tokens count
    against the limit), the newest history that fits beside the new message (the prefix is the client's
    own choice: it does not shrink the history), the message."""
    summary_text = summary_prompt_text(window.summary) if window.summary is not None else ""
    summary: list[Message] = [PromptMessage("system", summary_text)] if summary_text else []
    summary_tokens = window.summary.tokens + _SUMMARY_PREFIX_TOKENS if window.summary and summary_text else 0
    budget = ctx.tenant.policy.token_limit - (turn.user.tokens or 0) - summary_tokens
    history, history_tokens = window.messages, window.tokens
    if history_tokens > budget:  # the window fits the limit; with the new message it may not (O(window) only then)
        history = drop_unanswerable_start(fit_budget(history, budget))
        history_tokens = sum(m.tokens for m in history)
    messages: list[Message] = [*turn.prefix, *summary, *history, PromptMessage("user", turn.user.content)]
    return Prompt(messages, turn.prefix_tokens + summary_tokens + history_tokens + (turn.user.tokens or 0))


_SUMMARY_PREFIX_TOKENS = 8  # the summary message's opening line (SUMMARY_PREFIX) and its line break


async def start_model(ctx: TurnContext, prompt: Prompt, turn: ValidTurn) -> ModelStream:
    """Ask the model and wait for its first piece, so a model that fails before any output is still an
    ordinary error response (502), not an error in the middle of a stream."""
    stream = ModelStream(ctx.model.stream(prompt.messages, turn.options), turn.turn_id)
    await stream.first()
    return stream


async def commit(ctx: TurnContext, turn: ValidTurn, reply: str) -> CommittedTurn:
    """Round trip 2: the user message and the reply, adjacent and atomic; a turn id already stored
    stores nothing and returns the first answer (a concurrent retry)."""
    try:
        answer = ctx.store.prepare(NewMessage("assistant", reply))
    except MessageTooLarge as error:
        raise ModelFailed(f"the model's reply cannot be stored: {error}") from error
    with metrics.step("commit"), metrics.redis_operation("commit"):
        committed = await ctx.memory.commit(turn.session_id, turn.turn_id, turn.user, answer, turn.subject)
    if committed.duplicate:
        _check_same_message(committed, turn)
    elif committed.usage is not None:  # stored in Redis (ENGRAM_MEMORY=off stores nothing)
        metrics.observe_usage(ctx.tenant.name, committed.usage)
        metrics.observe_commit_node(redis_node(ctx, turn.session_id) or "none")
    return committed


def _check_same_message(stored: CommittedTurn, turn: ValidTurn) -> None:
    """A turn id names one message: replaying its reply for another message would answer the wrong one."""
    user = next((m.content for m in stored.messages if m.role == "user"), None)
    if user is not None and user != turn.user.content:
        raise TurnIdReused(
            f"turn_id {stored.turn_id!r} was already used for a different message; "
            "send a new turn_id for a new message (a retry must resend the same message)"
        )


# --- the model's stream -----------------------------------------------------------------------------
class ModelStream:
    """The model's reply being read: timed from the request to the last piece, its errors turned into
    :class:`ModelFailed` (summarized for the client, details logged with secrets masked)."""

    def __init__(self, pieces: AsyncGenerator[str, None], turn_id: str) -> None:
        self._pieces = pieces
        self._turn_id = turn_id
        self._started = time.perf_counter()
        self._head = ""
        self._finished = False

    async def first(self) -> None:
        """Wait for the first non-empty piece (some models send an empty one first)."""
        while (piece := await self._next()) is not None:
            if piece:
                self._head = piece
                return

    async def rest(self) -> AsyncIterator[str]:
        """The first piece, then every later one."""
        if self._head:
            yield self._head
        while (piece := await self._next()) is not None:
            if piece:
                yield piece

    async def _next(self) -> str | None:
        """The next piece, or None when the model is done."""
        if self._finished:
            return None
        try:
            return await anext(self._pieces)
        except StopAsyncIteration:
            self._finish("ok")
            return None
        except Exception as error:
            self._finish("error")
            log.warning("model call failed for turn %s: %s", self._turn_id, redact(f"{type(error).__name__}: {error}"))
            raise ModelFailed(summarize_model_error(error)) from error

    def _finish(self, outcome: str) -> None:
        if not self._finished:
            self._finished = True
            metrics.observe_model(outcome, time.perf_counter() - self._started)

    async def aclose(self) -> None:
        """Stop the model (its HTTP response is closed); a reply nobody reads is not generated to the end."""
        with contextlib.suppress(Exception):
            await self._pieces.aclose()


# --- the turn ---------------------------------------------------------------------------------------
class Turn:
    """A turn past its model's first piece (or a retry answered from the store): read the reply with
    :meth:`deltas` (the commit runs when the model is done; then :attr:`result` is set) or
    :meth:`collect`; :meth:`aclose` ends it however it ends, and counts its outcome once."""

    def __init__(
        self,
        ctx: TurnContext,
        turn: ValidTurn,
        window: Window,
        started: float,
        model: ModelStream | None,
        prompt_tokens: int,
    ) -> None:
        self.ctx, self.turn, self.window, self.started, self.model = ctx, turn, window, started, model
        self.prompt_tokens = prompt_tokens
        self.result: TurnResult | None = None
        self.outcome = "abandoned"  # until deltas() ends: the client went away
        self._closed = False

    async def deltas(self) -> AsyncIterator[str]:
        """The reply piece by piece; raises :class:`EngramError` (nothing stored) if the turn fails."""
        try:
            if self.model is None:  # a retry of a committed turn: its stored reply, the model not called
                assert self.window.replay is not None
                self.result, self.outcome = self._result(self.window.replay), "replayed"
                yield self.result.reply
                return
            parts: list[str] = []
            async for piece in self.model.rest():
                parts.append(piece)
                yield piece
            committed = await commit(self.ctx, self.turn, "".join(parts).strip())
            self.outcome = "duplicate" if committed.duplicate else "ok"
            self.result = self._result(committed)
        except EngramError as error:
            self.outcome = failure_outcome(error)
            raise

    async def collect(self) -> TurnResult:
        """The whole turn (the JSON answer)."""
        try:
            async for _ in self.deltas():
                pass
        finally:
            await self.aclose()
        assert self.result is not None
        return self.result

    async def aclose(self) -> None:
        """End the turn: stop the model if it is still answering, and count the outcome. Idempotent."""
        if self._closed:
            return
        self._closed = True
        if self.model is not None:
            await self.model.aclose()
        metrics.observe_turn(self.outcome, time.perf_counter() - self.started)

    def _result(self, stored: CommittedTurn) -> TurnResult:
        reply = stored.reply
        reply_tokens = sum(m.tokens for m in stored.messages if m.role == "assistant")
        window = self.window
        messages = len(window.messages)
        if window.replay is not None and window.replay.messages:
            # a retry: count what preceded the stored turn, as the first answer did (the window now holds it too)
            first = stream_id_key(window.replay.messages[0].id)
            messages = sum(1 for m in window.messages if stream_id_key(m.id) < first)
        return TurnResult(
            self.turn.session_id,
            self.turn.turn_id,
            reply,
            self.ctx.served_by,
            redis_node(self.ctx, self.turn.session_id),
            window.outcome,
            messages,
            self.prompt_tokens,
            reply_tokens,
        )


def redis_node(ctx: TurnContext, session_id: str) -> str | None:
    """``host:port`` of the Redis primary a session's commits go to now (on a Cluster, its slot's primary),
    or None when the turn's memory stores nothing."""
    if isinstance(ctx.memory, NullMemory):
        return None
    return primary_address(ctx.store.client, ctx.store.keys.session(ctx.tenant.name, session_id).log)


def failure_outcome(error: BaseException) -> str:
    """The ``engram_turns_total`` outcome of a turn that failed with ``error``."""
    if isinstance(error, InvalidInput | TurnIdReused):
        return "rejected"
    if isinstance(error, RateLimited | QuotaExceeded):  # rate_limited, session_quota_exceeded, ...
        return error.code
    if isinstance(error, StoreUnavailable | StoreFull):  # its code: store_unavailable, store_read_only, ...
        return error.code
    return "model_error"


async def start_turn(ctx: TurnContext, request: TurnRequest) -> Turn:
    """validate -> load -> the model's first piece (or the stored answer of a retry). A failure up to
    here raises (an ordinary error response) and is counted here; after it, :class:`Turn` counts."""
    started = time.perf_counter()
    try:
        turn = validate(ctx, request)
        window = await load(ctx, turn)
        if window.replay is not None:  # the stored turn's own user message stands for the prompt it had
            tokens = sum(m.tokens for m in window.replay.messages if m.role != "assistant")
            return Turn(ctx, turn, window, started, None, tokens)
        given = prompt(ctx, window, turn)
        model = await start_model(ctx, given, turn)
    except BaseException as error:  # a cancelled request (client gone, shutdown) is a turn's outcome too
        outcome = "abandoned" if isinstance(error, asyncio.CancelledError) else failure_outcome(error)
        metrics.observe_turn(outcome, time.perf_counter() - started)
        raise
    return Turn(ctx, turn, window, started, model, given.tokens)


async def chat_turn(ctx: TurnContext, request: TurnRequest) -> TurnResult:
    """Answer one message, the whole reply at once."""
    return await (await start_turn(ctx, request)).collect()
