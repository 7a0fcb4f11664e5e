"""One chat turn: a LlamaIndex chat engine over :class:`~engram.llama_index.EngramMemory`.

Nothing about a conversation stays in the process between requests: every turn rebuilds its memory
from Redis (two round trips: load the window, commit the pair), so any replica can serve any turn.

    validate  ->  load window (1)  ->  replay?  -> answer the stored reply, model not called
                                   ->  model    -> commit user+reply with turn_id (2)
                                                   duplicate? -> answer the reply stored first

A model failure commits nothing (502). Redis trouble before the commit commits nothing (503
``store_unavailable``; 507 ``store_full`` when Redis is at maxmemory, found by the load, before the model
runs); a commit that got no answer is 503 ``outcome_unknown`` with the turn id to retry with.

``ENGRAM_MEMORY=off`` is a benchmark baseline, not a mode to serve users with: the same engine and model
over a memory that starts empty and is dropped after the turn, so nothing is loaded or stored and the
model is given only the new message (``history.cache`` is then ``off``).
"""

from __future__ import annotations

import contextlib
import logging
import time
import uuid
from collections.abc import AsyncGenerator, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Literal

from llama_index.core.chat_engine import SimpleChatEngine
from llama_index.core.llms import LLM, ChatMessage, ChatResponseAsyncGen, MessageRole
from llama_index.core.memory import ChatMemoryBuffer

from engram.errors import EngramError, InvalidInput, MessageTooLarge, StoreFull, StoreUnavailable
from engram.history.store import HistoryStore, validate_turn_id
from engram.llama_index import EngramMemory
from engram.messages import CacheOutcome, CommittedTurn, NewMessage, Window, stream_id_key
from engram.policy import Tenant
from engram.redis_keys import validate_session_id
from engram.server import metrics
from engram.server.errors import ModelFailed, TurnIdReused, error_content, redact, summarize_model_error
from engram.server.schemas import ChatReply, ChatRequest, HistoryInfo

log = logging.getLogger("engram.server")


@dataclass(frozen=True, slots=True)
class TurnContext:
    """What a turn needs besides the request: shared per process, except the tenant."""

    store: HistoryStore
    llm: LLM
    tenant: Tenant
    served_by: str
    memory: bool = True  # False: ENGRAM_MEMORY=off, the stateless benchmark baseline


@dataclass(frozen=True, slots=True)
class TurnResult:
    session_id: str
    turn_id: str
    reply: str
    served_by: str
    cache: CacheOutcome | Literal["off"]
    messages: int

    def body(self) -> ChatReply:
        return ChatReply(
            session_id=self.session_id,
            turn_id=self.turn_id,
            reply=self.reply,
            served_by=self.served_by,
            history=HistoryInfo(cache=self.cache, messages=self.messages),
        )


def validate_request(ctx: TurnContext, request: ChatRequest) -> str:
    """Check everything that can be checked without Redis; return the turn id (generated if absent).

    A message must fit both the byte limit and the tenant's token limit (the model is given the
    message plus as much history as fits that limit: a message over it leaves no room even for itself).
    """
    validate_session_id(request.session_id)
    turn_id = validate_turn_id(request.turn_id) if request.turn_id is not None else uuid.uuid4().hex
    ctx.store.validate(NewMessage("user", request.message))  # the store's own rules, before the model runs
    token_limit = ctx.tenant.policy.token_limit
    if len(request.message.encode("utf-8")) > token_limit:  # a token is at least one byte: only then can it be over
        tokens = ctx.store.count_tokens(request.message)
        if tokens > token_limit:
            raise MessageTooLarge(f"message of {tokens} tokens is over the token limit of {token_limit}")
    return turn_id


@dataclass
class _TurnOutcome:
    outcome: str = "ok"
    started: float = field(default_factory=time.perf_counter)


@contextmanager
def _turn_metrics(*, failures_only: bool = False) -> Iterator[_TurnOutcome]:
    """Record the turn's outcome and duration when the block ends (with ``failures_only``, only when
    it fails: a stream that started records its outcome when it ends)."""
    turn = _TurnOutcome()
    try:
        yield turn
    except Exception as error:
        metrics.observe_turn(_failure_outcome(error), time.perf_counter() - turn.started)
        raise
    if not failures_only:
        metrics.observe_turn(turn.outcome, time.perf_counter() - turn.started)


def _failure_outcome(error: Exception) -> str:
    if isinstance(error, InvalidInput | TurnIdReused):
        return "rejected"
    if isinstance(error, StoreUnavailable | StoreFull):  # its code: store_unavailable, store_read_only, ...
        return error.code
    return "model_error"


def _model_failure(error: Exception, clock: metrics.ModelClock, turn_id: str) -> Exception:
    """What to raise for an exception out of the model call or the commit after it: store errors pass
    through (an unanswered commit is the store's ``OutcomeUnknown``), the rest came from the model (a
    reply too large to store counts as the model's failure, too).

    A model error is summarized for the client (its type, and the upstream HTTP status if any); its
    text, which can echo request headers, goes to the log only, with secrets masked."""
    if isinstance(error, MessageTooLarge):
        clock.finish("ok")
        return ModelFailed(f"the model's reply cannot be stored: {error}")
    if isinstance(error, EngramError):
        clock.finish("ok")
        return error
    clock.finish("error")
    log.warning("model call failed for turn %s: %s", turn_id, redact(f"{type(error).__name__}: {error}"))
    return ModelFailed(summarize_model_error(error))


async def _begin(ctx: TurnContext, request: ChatRequest, turn_id: str) -> tuple[EngramMemory, Window]:
    """Round trip 1: the memory of this turn with its window loaded (and, for a retry, the stored turn,
    which must be of the same message)."""
    memory = EngramMemory(
        store=ctx.store,
        tenant=ctx.tenant.name,
        session_id=request.session_id,
        policy=ctx.tenant.policy,
        turn_id=turn_id,
    )
    started = time.perf_counter()
    with metrics.redis_operation("load"):
        window = await memory.aload()
    metrics.observe_load(window, time.perf_counter() - started)
    if window.replay is not None:
        _check_same_message(window.replay, request)
    return memory, window


def _stateless_engine(ctx: TurnContext) -> SimpleChatEngine:
    """ENGRAM_MEMORY=off: the same engine over an in-process memory that starts empty (nothing loaded)
    and is dropped after the turn (nothing stored)."""
    memory = ChatMemoryBuffer.from_defaults(token_limit=ctx.tenant.policy.token_limit)
    return SimpleChatEngine.from_defaults(llm=ctx.llm, memory=memory)


def _result(ctx: TurnContext, request: ChatRequest, turn_id: str, window: Window | None, reply: str) -> TurnResult:
    if window is None:  # ENGRAM_MEMORY=off
        return TurnResult(request.session_id, turn_id, reply, ctx.served_by, cache="off", messages=0)
    messages = len(window.messages)
    if window.replay is not None and window.replay.messages:
        # a retry: count what preceded the stored turn, as the first answer did (the window now holds it too)
        first = stream_id_key(window.replay.messages[0].id)
        messages = sum(1 for m in window.messages if stream_id_key(m.id) < first)
    return TurnResult(
        session_id=request.session_id,
        turn_id=turn_id,
        reply=reply,
        served_by=ctx.served_by,
        cache=window.outcome,
        messages=messages,
    )


def _committed(memory: EngramMemory, request: ChatRequest) -> CommittedTurn:
    committed = memory.committed
    if committed is None:  # the engine returned without putting the reply: treat as a model failure
        raise ModelFailed("the model returned no message")
    if committed.duplicate:  # a concurrent request with the same turn id stored first
        _check_same_message(committed, request)
    return committed


def _check_same_message(stored: CommittedTurn, request: ChatRequest) -> None:
    """A turn id names one message: replaying its reply for another message would answer the wrong one."""
    user = next((m.content for m in stored.messages if m.role == "user"), None)
    if user is not None and user != request.message:
        raise TurnIdReused(
            f"turn_id {stored.turn_id!r} was already used for a different message; "
            "send a new turn_id for a new message (a retry must resend the same message)"
        )


async def chat_turn(ctx: TurnContext, request: ChatRequest) -> TurnResult:
    """Answer one message (non-streaming)."""
    with _turn_metrics() as turn:
        turn_id = validate_request(ctx, request)
        if not ctx.memory:
            clock = metrics.start_model_clock()
            try:
                response = await _stateless_engine(ctx).achat(request.message)
            except Exception as error:
                raise _model_failure(error, clock, turn_id) from error
            return _result(ctx, request, turn_id, None, str(response))
        memory, window = await _begin(ctx, request, turn_id)
        if window.replay is not None:
            turn.outcome = "replayed"
            return _result(ctx, request, turn_id, window, window.replay.reply)
        engine = SimpleChatEngine.from_defaults(llm=ctx.llm, memory=memory)
        clock = metrics.start_model_clock()
        try:
            with metrics.redis_operation("commit"):
                await engine.achat(request.message)
        except Exception as error:
            raise _model_failure(error, clock, turn_id) from error
        committed = _committed(memory, request)
        turn.outcome = "duplicate" if committed.duplicate else "ok"
        return _result(ctx, request, turn_id, window, committed.reply)


# --- streaming ----------------------------------------------------------------------------------------
Event = tuple[str, dict[str, Any]]


class StreamingTurn:
    """A turn whose model has produced its first token: the rest is read by :meth:`events`.

    The model's stream is read here, in the request's own task, not by a LlamaIndex background task:
    when the client leaves, closing :meth:`events` closes the model's stream (and its HTTP response),
    so an abandoned reply is neither generated to the end nor committed."""

    def __init__(
        self,
        ctx: TurnContext,
        request: ChatRequest,
        turn_id: str,
        memory: EngramMemory | None,
        window: Window | None,
        stream: ChatResponseAsyncGen | None,
        first: str,
        clock: metrics.ModelClock,
        started: float,
    ) -> None:
        self.ctx, self.request, self.turn_id = ctx, request, turn_id
        self.memory, self.window, self.stream, self.first = memory, window, stream, first
        self.clock, self.started = clock, started
        self.outcome = "abandoned"  # until events() reaches done or error: the client went away
        self._closed = False

    async def aclose(self) -> None:
        """End the turn: close the model's stream (and its HTTP response, so an abandoned reply stops being
        generated and billed) and count the turn's outcome. Safe to call more than once."""
        if self._closed:
            return
        self._closed = True
        if self.stream is not None:
            with contextlib.suppress(Exception):
                await self.stream.aclose()
        metrics.observe_turn(self.outcome, time.perf_counter() - self.started)

    async def events(self) -> AsyncGenerator[Event, None]:
        """``("token", {"text"})`` events, then ``("done", reply fields)`` or ``("error", error body)``."""
        try:
            if self.first:
                yield "token", {"text": self.first}
            if self.stream is not None:
                parts = [self.first]
                try:
                    async for chunk in self.stream:
                        if chunk.delta:
                            parts.append(chunk.delta)
                            yield "token", {"text": chunk.delta}
                    self.clock.finish("ok")
                    reply = "".join(parts).strip()
                    if self.memory is not None:  # the commit: user message and reply, one round trip
                        with metrics.redis_operation("commit"):
                            await self.memory.aput(ChatMessage(role=MessageRole.ASSISTANT, content=reply))
                except Exception as error:
                    raise _model_failure(error, self.clock, self.turn_id) from error
                if self.memory is None:  # ENGRAM_MEMORY=off: nothing was stored
                    self.outcome = "ok"
                else:
                    committed = _committed(self.memory, self.request)
                    self.outcome = "duplicate" if committed.duplicate else "ok"
                    reply = committed.reply
            else:
                self.outcome, reply = "replayed", self.first
            result = _result(self.ctx, self.request, self.turn_id, self.window, reply)
            yield "done", result.body().model_dump()
        except EngramError as error:
            self.outcome = _failure_outcome(error)
            _, body, _ = error_content(error)
            yield "error", body
        finally:
            await self.aclose()


async def _first_delta(stream: ChatResponseAsyncGen) -> str:
    """The first non-empty piece of the model's reply (some models send an empty one first)."""
    async for chunk in stream:
        if chunk.delta:
            return chunk.delta
    return ""


async def open_stream(ctx: TurnContext, request: ChatRequest) -> StreamingTurn:
    """Start a streamed turn and wait for the model's first token, so that a failure before any
    output is still an ordinary error response (502/503) rather than an error event."""
    with _turn_metrics(failures_only=True) as turn:
        turn_id = validate_request(ctx, request)
        memory: EngramMemory | None = None
        window: Window | None = None
        user = ChatMessage(role=MessageRole.USER, content=request.message)
        if ctx.memory:
            memory, window = await _begin(ctx, request, turn_id)
            if window.replay is not None:
                return StreamingTurn(
                    ctx, request, turn_id, memory, window, None, window.replay.reply, metrics.ModelClock(), turn.started
                )
            # What SimpleChatEngine.astream_chat gives the model: the window, then the new message (held
            # by the memory until the reply commits both).
            await memory.aput(user)
            messages = await memory.aget()
        else:
            messages = [user]
        clock = metrics.start_model_clock()
        try:
            stream = await ctx.llm.astream_chat(messages)
            first = await _first_delta(stream)
        except Exception as error:
            raise _model_failure(error, clock, turn_id) from error
    return StreamingTurn(ctx, request, turn_id, memory, window, stream, first, clock, turn.started)
