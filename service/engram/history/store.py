"""The history store: durable chat history in Redis whose per-turn cost does not grow with the session.

A chat turn costs two Redis round trips, whatever the length of the conversation:

1. :meth:`HistoryStore.load_window` - one ``FCALL`` (write-checked: refused when a commit would be)
   that validates this process's cached tail and returns only what changed (``hit`` / ``delta``), or
   the newest messages that fit the token budget (``miss``), reading about one window of entries and
   never the whole session.
2. :meth:`HistoryStore.commit_turn` - one ``FCALL`` that appends the user message and the reply
   adjacently and atomically, refreshes the TTL, applies the retention cap and updates the tenant's
   session index. Idempotent by ``turn_id``.

Every method raises :class:`~engram.errors.StoreUnavailable` when Redis cannot be reached and the
:class:`~engram.errors.InvalidInput` family for bad input, before anything is written.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import dataclasses
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from contextlib import asynccontextmanager
from typing import Any, TypeVar

from redis.asyncio import connection as redis_connection
from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.exceptions import (
    AskError,
    ClusterError,
    MovedError,
    OutOfMemoryError,
    ReadOnlyError,
    RedisClusterException,
    ResponseError,
    TryAgainError,
)
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from engram.connections import RedisClient
from engram.errors import (
    EngramError,
    InvalidCursor,
    InvalidMessage,
    MessageTooLarge,
    NotReplicated,
    OutcomeUnknown,
    RateLimited,
    SessionQuotaExceeded,
    StorageQuotaExceeded,
    StoreFull,
    StoreReadOnly,
    StoreUnavailable,
    SubjectMismatch,
)
from engram.history.cache import LoadReply, LoadRequest, TailCache, drop_unanswerable_start, merge
from engram.history.functions import (
    FN_COMMIT,
    FN_DELETE_AT,
    FN_DELETE_SESSION,
    FN_INSERT_AT,
    FN_LOAD,
    FN_PRUNE_INDEX,
    FN_RATE,
    FN_REPLACE,
    FN_SUMMARY_ADVANCE,
    FN_TAKE_OLDEST,
    FN_USAGE,
    FN_WRITABLE,
    ensure_library,
)
from engram.messages import (
    CommittedTurn,
    MessagePage,
    NewMessage,
    SessionInfo,
    SessionPage,
    SessionSummary,
    StoredMessage,
    Usage,
    Window,
    stream_id_key,
)
from engram.policy import Policy
from engram.redis_keys import (
    SESSION_ID_PATTERN,
    KeySpace,
    SessionKeys,
    matching,
    validate_session_id,
    validate_subject_id,
    validate_tenant,
)
from engram.tokens import Tokenizer, default_tokenizer

T = TypeVar("T")


@dataclasses.dataclass(frozen=True, slots=True)
class ExportedMessage:
    message: StoredMessage
    archived: bool  # moved to the session's archive (LlamaIndex Memory), no longer in its window


ROLES = frozenset({"system", "developer", "user", "assistant", "tool", "function", "chatbot", "model"})
TURN_ID_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,127}")
DEFAULT_MAX_MESSAGE_BYTES = 32 * 1024
DEFAULT_MAX_WINDOW_MESSAGES = 10_000
_STREAM_ID = re.compile(r"(0|[1-9]\d{0,19})-(0|[1-9]\d{0,19})")  # canonical, as Redis writes ids
_MAX_ID_PART = 2**64 - 1
MAX_CURSOR_LENGTH = 512  # a session id's cursor is at most 172 characters
MIGRATION_PATIENCE_SECONDS = 3.0  # how long a call waits for its slot to finish moving (a reshard)


def _migration_backoff() -> Iterator[float]:
    """Seconds to wait between tries of a call whose slot is moving: 20 ms doubling up to 200 ms, forever."""
    delay = 0.02
    while True:
        yield delay
        delay = min(delay * 2, 0.2)


def _text(value: Any) -> str:
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def _parse_entry(entry: Sequence[Any]) -> StoredMessage:
    """An entry as FCALL returns it (``[id, [k, v, ...]]``) or as redis-py parses XRANGE (``(id, {k: v})``)."""
    message_id, raw = entry[0], entry[1]
    if isinstance(raw, dict):
        fields = {_text(k): _text(v) for k, v in raw.items()}
    else:
        fields = {_text(raw[i]): _text(raw[i + 1]) for i in range(0, len(raw), 2)}
    return StoredMessage(
        id=_text(message_id),
        role=fields.get("role", "user"),
        content=fields.get("content", ""),
        tokens=int(fields.get("tokens", "0")),
        turn_id=fields.get("turn"),
        extra=fields.get("extra"),
    )


def _library_refusal(message: str) -> EngramError | None:
    """The error a library function's refusal stands for (engram.lua's ``ENGRAM_*`` error replies)."""
    word, _, rest = message.partition(" ")
    parts = rest.split()
    if word == "ENGRAM_RATE" and parts:
        wait = int(parts[0]) / 1000
        return RateLimited(f"over the tenant's request rate; retry in {wait:.3f} s", wait)
    if word == "ENGRAM_QUOTA" and parts[:1] == ["sessions"]:
        return SessionQuotaExceeded(
            f"the tenant has its maximum of {parts[1]} sessions; delete sessions (or let them expire) "
            "or ask for a higher maxSessions"
        )
    if word == "ENGRAM_QUOTA" and parts[:1] == ["bytes"]:
        return StorageQuotaExceeded(
            f"this turn would take the tenant over its storage quota ({parts[2]} of {parts[1]} bytes used); "
            "delete sessions (or let them expire) or ask for a higher maxStoredBytes"
        )
    if word == "ENGRAM_SUBJECT":
        return SubjectMismatch("this session belongs to another subject; a session has one subject")
    return None


def _parse_summary(raw: Sequence[Any], window: Sequence[StoredMessage]) -> SessionSummary:
    """The load's summary reply ``[text, covers_through, messages_covered, tokens, probe_id]``; due when
    the probe (the batch-th uncovered message) is older than the window's first message."""
    if not raw:
        return SessionSummary()
    text, covers, covered, tokens, probe = (_text(v) for v in raw)
    due = bool(probe) and bool(window) and stream_id_key(probe) < stream_id_key(window[0].id)
    return SessionSummary(text, covers or None, int(covered), int(tokens), due)


_REDIS_IO_FILE = redis_connection.__file__


def _raised_in_redis_io(error: BaseException) -> bool:
    """Whether ``error`` was raised inside redis-py's connection I/O (redis.asyncio.connection)."""
    frame = error.__traceback__
    while frame is not None:
        if frame.tb_frame.f_code.co_filename == _REDIS_IO_FILE:
            return True
        frame = frame.tb_next
    return False


@asynccontextmanager
async def redis_errors() -> AsyncIterator[None]:
    """Redis' failures as Engram's errors: unreachable or timed out -> :class:`StoreUnavailable`, full ->
    :class:`StoreFull`, refusing writes -> :class:`StoreReadOnly`, a library function's refusal -> its error."""
    try:
        yield
    except (RedisConnectionError, RedisTimeoutError, OSError) as error:
        raise StoreUnavailable(f"Redis is unavailable: {error}") from error
    except (ClusterError, TryAgainError, AskError, RedisClusterException) as error:
        # a Cluster without a primary for the slot (a failover), or a slot still moving after the retries
        # (AskError: MOVED and ASK redirects redis-py did not follow)
        raise StoreUnavailable(f"Redis Cluster is unavailable for this session: {error}") from error
    except (RuntimeError, AttributeError, TypeError) as error:
        # A connection closed under the call, which redis-py 8.1.0 lets escape from its socket I/O as a
        # non-Redis error: uvloop's RuntimeError for a write on a transport the node closed, or the writer
        # gone (None) because another task closed the connection meanwhile, as redis-py's cluster client
        # does to every connection on CLUSTERDOWN during a failover (redis/redis-py#4287; the fix, #4288,
        # is merged but not released). Told apart from Engram's own bugs by where it was raised, not its text.
        if not _raised_in_redis_io(error):
            raise
        raise StoreUnavailable(f"Redis is unavailable: the connection was closed ({error})") from error
    except OutOfMemoryError as error:
        raise StoreFull("Redis is full (maxmemory reached): it refuses writes until space is freed") from error
    except ReadOnlyError as error:  # a replica, e.g. during a failover: writes come back with the primary
        raise StoreReadOnly("Redis is read-only (a replica): it refuses writes") from error
    except ResponseError as error:
        # Writes refused for now: too few replicas (min-replicas-to-write) or failing snapshots.
        if str(error).startswith(("NOREPLICAS", "MISCONF")):
            raise StoreReadOnly(f"Redis refuses writes for now: {str(error).split('.')[0]}") from error
        refusal = _library_refusal(str(error))
        if refusal is not None:
            raise refusal from error
        raise


def _encode_cursor(value: str) -> str:
    return base64.urlsafe_b64encode(value.encode()).decode().rstrip("=")


def _invalid_cursor(cursor: str) -> InvalidCursor:
    return InvalidCursor(f"invalid cursor {cursor[:100]!r}: pass back a `next` value unchanged")


def _decode_cursor(cursor: str, check: re.Pattern[str]) -> str:
    if len(cursor) > MAX_CURSOR_LENGTH:
        raise _invalid_cursor(cursor)
    try:
        value = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
    except (binascii.Error, UnicodeDecodeError, ValueError):
        raise _invalid_cursor(cursor) from None
    if not check.fullmatch(value):
        raise _invalid_cursor(cursor)
    return value


def _decode_stream_cursor(cursor: str) -> str:
    """The stream id a message-page cursor holds: one Redis accepts as an exclusive start, i.e. both
    parts fit 64 bits and it is not the largest id (nothing comes after it; Redis refuses ``(max``)."""
    value = _decode_cursor(cursor, _STREAM_ID)
    ms, seq = (int(part) for part in value.split("-"))
    if ms > _MAX_ID_PART or seq > _MAX_ID_PART or (ms, seq) == (_MAX_ID_PART, _MAX_ID_PART):
        raise _invalid_cursor(cursor)
    return value


def validate_turn_id(turn_id: object) -> str:
    expected = "1-128 characters of [A-Za-z0-9._:-], starting with a letter or digit"
    return matching(turn_id, TURN_ID_PATTERN, InvalidMessage, "turn id", expected)


class HistoryStore:
    """Chat history of many tenants and sessions in one Redis.

    ``client`` is a ``redis.asyncio.Redis`` (see :func:`engram.connections.create_redis` for one with
    the timeouts Engram expects). ``cache_sessions`` bounds the per-process tail cache (0 disables it).
    The tokenizer counts tokens once per message, at write time.
    """

    def __init__(
        self,
        client: RedisClient,
        keys: KeySpace | None = None,
        *,
        cache_sessions: int = 10_000,
        tokenizer: Tokenizer | None = None,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
        max_window_messages: int = DEFAULT_MAX_WINDOW_MESSAGES,
        commit_durability: str = "local",
        commit_replica_timeout_ms: int = 1000,
    ) -> None:
        self.client = client
        # "replicated": a commit is acknowledged only once a replica has it (see _commit)
        self.commit_durability = commit_durability
        self.commit_replica_timeout_ms = commit_replica_timeout_ms
        self.keys = keys or KeySpace()
        self.cache = TailCache(cache_sessions)
        self.cache_capacity = cache_sessions
        self.count_tokens = tokenizer or default_tokenizer()
        self.max_message_bytes = max_message_bytes
        self.max_window_messages = max_window_messages

    # --- plumbing -------------------------------------------------------------------------------------
    async def _call(self, make_call: Callable[[], Awaitable[T]]) -> T:
        """Run one Redis call; load the function library once if Redis says it is missing."""
        async with redis_errors():
            try:
                return await self._through_migrations(make_call)
            except ResponseError as error:
                if "Function not found" not in str(error):
                    raise
            await ensure_library(self.client)
            return await self._through_migrations(make_call)

    async def _through_migrations(self, make_call: Callable[[], Awaitable[T]]) -> T:
        """On a Cluster, a call that meets its slot half migrated (a reshard moving the tenant's keys: TRYAGAIN,
        which redis-py retries for only about 0.4 s) is sent again until the slot has moved, for up to
        MIGRATION_PATIENCE_SECONDS: a reshard delays a turn instead of failing it. Safe to repeat: a call
        refused with TRYAGAIN or a redirect did not run."""
        if not isinstance(self.client, RedisCluster):
            return await make_call()
        deadline = time.monotonic() + MIGRATION_PATIENCE_SECONDS
        for delay in _migration_backoff():
            try:
                return await make_call()
            except (TryAgainError, ClusterError) as error:
                migrating = isinstance(error, TryAgainError) or "TTL exhausted" in str(error)
                if not migrating or time.monotonic() + delay > deadline:
                    raise
            await asyncio.sleep(delay)
        raise AssertionError("unreachable")  # (the backoff never ends)

    async def _call_on_session(
        self, function: str, keys: SessionKeys, *args: str | int, subject_key: str | None = None
    ) -> Any:
        """FCALL a library function that takes the session's keys in the fixed order of
        :meth:`SessionKeys.function_keys` (and, for commit and delete_session, a subject's set)."""
        all_keys = keys.function_keys() + ((subject_key,) if subject_key else ())
        return await self._call(lambda: self.client.fcall(function, len(all_keys), *all_keys, *args))

    async def ensure_library(self) -> bool:
        """Load Engram's Redis functions if they are missing (needs a user allowed to FUNCTION LOAD)."""
        async with redis_errors():
            return await ensure_library(self.client)

    async def ping(self) -> bool:
        async with redis_errors():
            return bool(await self.client.ping())

    async def check_writable(self) -> None:
        """Raise :class:`StoreFull` or :class:`StoreUnavailable` unless Redis would take a commit now
        (it answers, is a primary, and is under maxmemory): a write-flagged function that writes nothing."""
        await self._call(lambda: self.client.fcall(FN_WRITABLE, 0))

    def _session(self, tenant: str, session_id: str) -> SessionKeys:
        return self.keys.session(validate_tenant(tenant), validate_session_id(session_id))

    def validate(self, message: NewMessage) -> None:
        """Raise the InvalidInput error that storing ``message`` would raise (role, content, size)."""
        if message.role not in ROLES:
            raise InvalidMessage(f"invalid role {message.role!r}: expected one of {sorted(ROLES)}")
        if not isinstance(message.content, str):
            raise InvalidMessage("message content must be a string")
        if message.role == "user" and not message.content.strip() and message.extra is None:
            raise InvalidMessage("message is empty")  # (a message of images only has its blocks in extra)
        try:
            size = len(message.content.encode("utf-8"))
        except UnicodeEncodeError:
            raise InvalidMessage("message content is not valid Unicode (lone surrogate)") from None
        if size > self.max_message_bytes:
            raise MessageTooLarge(f"message of {size} bytes is over the limit of {self.max_message_bytes} bytes")

    def prepare(self, message: NewMessage) -> NewMessage:
        """``message`` validated and with its token count: the count the store writes with it."""
        self.validate(message)
        if message.tokens is not None:
            return message
        return dataclasses.replace(message, tokens=self.count_tokens(message.content))

    def _message_args(self, messages: Sequence[NewMessage]) -> list[str | int]:
        """Flatten messages for the library, each validated and counted once."""
        args: list[str | int] = []
        for message in map(self.prepare, messages):
            args += [message.role, message.content, message.tokens or 0, message.extra or ""]
        return args

    # --- the hot path ---------------------------------------------------------------------------------
    async def load_window(
        self,
        tenant: str,
        session_id: str,
        token_budget: int,
        *,
        turn_id: str | None = None,
        summary_batch: int = 0,
        policy: Policy | None = None,
    ) -> Window:
        """The newest messages that fit ``token_budget``, oldest first, in one round trip.

        With ``turn_id``, ``Window.replay`` carries that turn if it was already committed (a client
        retry): the caller can answer it without running the model again. With ``summary_batch`` > 0,
        ``Window.summary`` is the session's rolling summary, read in the same call, and ``due`` when at
        least that many messages older than the window are not covered by it yet. With a ``policy`` that
        limits the tenant's request rate, the same call counts the request (:class:`RateLimited` when over it).
        """
        keys = self._session(tenant, session_id)
        if turn_id is not None:
            validate_turn_id(turn_id)
        if token_budget < 0:
            raise InvalidMessage("token budget must not be negative")
        tail = self.cache.get(keys.log)
        request = LoadRequest.for_tail(tail, token_budget)
        # FCALL of a write-flagged function: Redis refuses it (OOM, READONLY) exactly when it would refuse
        # the commit that follows, so a turn fails before its model runs, not after.
        rate, burst = (policy.requests_per_second, policy.effective_burst) if policy else (0, 0)
        raw = await self._call(
            lambda: self.client.fcall(
                FN_LOAD,
                5,
                keys.log,
                keys.meta,
                keys.turns,
                keys.summary,
                keys.rate,
                request.epoch,
                request.after_id,
                token_budget,
                self.max_window_messages,
                turn_id or "",
                summary_batch,
                rate,
                burst,
            )
        )
        epoch, first_id, complete, replay_entries, entries = raw[:5]
        reply = LoadReply(
            epoch=_text(epoch),
            first_id=_text(first_id),
            complete=int(complete) == 1,
            entries_newest_first=[_parse_entry(e) for e in entries],
        )
        outcome, new_tail = merge(request, tail, reply, token_budget)
        self.cache.put(keys.log, new_tail)
        messages = drop_unanswerable_start(list(new_tail.messages)) if new_tail else []
        replay = None
        if replay_entries and turn_id:
            replay = CommittedTurn(turn_id, [_parse_entry(e) for e in replay_entries], duplicate=True)
            await self.confirm_replicated(tenant, turn_id)  # answered as stored: it must be as durable as a commit
        fitted = new_tail.messages if new_tail else ()
        reaches_start = new_tail.complete if new_tail else True
        summary = _parse_summary(raw[5], messages) if summary_batch > 0 else None
        return Window(messages, outcome, sum(m.tokens for m in messages), replay, fitted, reaches_start, summary)

    async def commit_turn(
        self,
        tenant: str,
        session_id: str,
        turn_id: str,
        user_message: str | NewMessage,
        assistant_message: str | NewMessage,
        policy: Policy | None = None,
        *,
        subject: str | None = None,
    ) -> CommittedTurn:
        """Append the user message and the reply as one adjacent, atomic pair (one round trip).
        Messages given as :class:`NewMessage` keep the token count :meth:`prepare` gave them."""
        user = user_message if isinstance(user_message, NewMessage) else NewMessage("user", user_message)
        reply = assistant_message
        if not isinstance(reply, NewMessage):
            reply = NewMessage("assistant", reply)
        return await self.append(tenant, session_id, [user, reply], policy, turn_id=turn_id, subject=subject)

    async def append(
        self,
        tenant: str,
        session_id: str,
        messages: Sequence[NewMessage],
        policy: Policy | None = None,
        *,
        turn_id: str | None = None,
        label: str = "",
        subject: str | None = None,
    ) -> CommittedTurn:
        """Append messages atomically and adjacently. With ``turn_id`` the call is idempotent: a
        second call with the same id stores nothing and returns the first call's messages. ``label``
        (kept in the session's meta as ``key``) names the session for the LlamaIndex adapters. A
        ``subject`` (an end user's id) links the session to it for erasure by subject; a session has
        one subject (:class:`SubjectMismatch` otherwise). The policy's quotas are checked in the same call
        (:class:`SessionQuotaExceeded`, :class:`StorageQuotaExceeded`: nothing written)."""
        keys = self._session(tenant, session_id)
        policy = policy or Policy()
        if turn_id is not None:
            validate_turn_id(turn_id)
        subject_key = self.keys.subject(tenant, subject) if subject is not None else None
        if not messages:
            raise InvalidMessage("nothing to append")
        args = self._message_args(messages)
        all_keys = keys.function_keys() + ((subject_key,) if subject_key else ())
        fcall_args = (
            turn_id or "", policy.session_ttl_seconds, policy.max_messages_per_session, session_id, label,
            policy.max_sessions, policy.max_stored_bytes, subject or "", len(messages), *args,
        )  # fmt: skip
        try:
            raw = await self._commit(tenant, all_keys, fcall_args, turn_id)
        except StoreUnavailable as error:
            # Sent, perhaps, and unanswered: a frozen or slow Redis still runs what it queued. With a turn
            # id that is retryable as it is (the commit is idempotent); a refusal (read-only) is definite.
            if turn_id is None or isinstance(error, StoreReadOnly | OutcomeUnknown):
                raise
            raise OutcomeUnknown(str(error), turn_id) from error
        duplicate, epoch, entries = raw[0], _text(raw[1]), [_parse_entry(e) for e in raw[2]]
        if int(duplicate) == 1:
            return CommittedTurn(turn_id or "", entries, duplicate=True)
        self.cache.extend(keys.log, epoch, _text(raw[3]), entries, policy.token_limit)
        return CommittedTurn(turn_id or "", entries, usage=Usage(int(raw[4]), int(raw[5])))

    # --- rolling summary (off the hot path; docs/design.md, "Rolling summary") -------------------------
    async def read_summary(self, tenant: str, session_id: str) -> tuple[str, SessionSummary] | None:
        """``(epoch, summary)`` of the session, or None when it does not exist. A summary written under
        another epoch (the log was rewritten since) is void: an empty summary is returned."""
        keys = self._session(tenant, session_id)
        async with redis_errors():
            async with self.client.pipeline(transaction=False) as pipe:
                pipe.hget(keys.meta, "epoch")
                pipe.hgetall(keys.summary)
                epoch, fields = await pipe.execute()
        if epoch is None:
            return None
        epoch = _text(epoch)
        stored = {_text(k): _text(v) for k, v in (fields or {}).items()}
        if stored.get("epoch") != epoch:
            return epoch, SessionSummary()
        return epoch, SessionSummary(
            stored.get("text", ""),
            stored.get("covers_through") or None,
            int(stored.get("messages_covered", "0")),
            int(stored.get("tokens", "0")),
        )

    async def messages_after(
        self, tenant: str, session_id: str, after: str | None, before: str | None, count: int
    ) -> list[StoredMessage]:
        """At most ``count`` messages with ids after ``after`` and before ``before`` (both exclusive; None:
        from the start / to the end), oldest first: what a summarizer folds next."""
        keys = self._session(tenant, session_id)
        async with redis_errors():
            entries = await self.client.xrange(
                keys.log, min="-" if after is None else f"({after}", max="+" if before is None else f"({before}",
                count=count,
            ) or []  # fmt: skip
        return [_parse_entry(e) for e in entries]

    async def advance_summary(
        self,
        tenant: str,
        session_id: str,
        epoch: str,
        expected: str | None,
        text: str,
        covers_through: str,
        count: int,
    ) -> bool:
        """Compare-and-set: store ``text`` as the summary covering ``count`` more messages, through
        ``covers_through``, only if the session still has ``epoch`` and its summary still covers through
        ``expected``. False when another summarizer or a rewrite got there first (drop the result)."""
        keys = self._session(tenant, session_id)
        tokens = self.count_tokens(text)
        args = (keys.log, keys.meta, keys.summary, epoch, expected or "", text, covers_through, count, tokens)
        raw = await self._call(lambda: self.client.fcall(FN_SUMMARY_ADVANCE, 3, *args))
        return int(raw) == 1

    # --- commit durability ------------------------------------------------------------------------------
    async def _commit(self, tenant: str, keys: Sequence[str], args: Sequence[str | int], turn_id: str | None) -> Any:
        """FCALL commit; with ``commit_durability="replicated"`` followed by ``WAIT 1 <ms>`` in the same
        round trip (a pipeline, no transaction), and :class:`NotReplicated` when no replica confirmed it.
        A retry of a stored turn wrote nothing, so WAIT would count nothing: it is confirmed separately."""
        if self.commit_durability != "replicated":
            return await self._call(lambda: self.client.fcall(FN_COMMIT, len(keys), *keys, *args))
        commit = ("FCALL", FN_COMMIT, len(keys), *keys, *args)
        raw, replicas = await self._call(lambda: self._write_then_wait(keys[0], [commit]))
        if int(raw[0]) == 1:  # a duplicate: stored earlier, perhaps never replicated
            await self.confirm_replicated(tenant, turn_id or "")
        elif int(replicas) < 1:
            raise self._not_replicated(turn_id or "")
        return raw

    async def confirm_replicated(self, tenant: str, turn_id: str) -> None:
        """With ``replicated`` durability, make sure a replica has everything this primary stored so far
        (so a turn found stored by a retry too): a small write, then WAIT for it, in one round trip.
        Raises :class:`NotReplicated` when no replica confirms in time."""
        if self.commit_durability != "replicated":
            return
        barrier = self.keys.replication_barrier(tenant)
        writes = [("HINCRBY", barrier, "n", 1), ("EXPIRE", barrier, 60)]
        try:
            replicas = (await self._call(lambda: self._write_then_wait(barrier, writes)))[-1]
        except StoreUnavailable as error:
            if isinstance(error, StoreReadOnly):
                raise
            raise OutcomeUnknown(str(error), turn_id) from error
        if int(replicas) < 1:
            raise self._not_replicated(turn_id)

    async def _write_then_wait(self, key: str, commands: Sequence[tuple[Any, ...]]) -> list[Any]:
        """``commands`` (writes to ``key``'s slot), then ``WAIT 1 <ms>``, on one connection in one round trip.
        Returns their replies, WAIT's (the replicas that confirmed) last.

        WAIT counts the writes of its own connection. On a Cluster, redis-py would send WAIT to any node
        and follow a redirected write alone, so the writes and WAIT go to the slot's node together, and a
        redirect (MOVED after a failover, ASK or TRYAGAIN while a reshard moves the slot) sends all of them
        again where the cluster says: a redirected write did not run, so repeating it is safe."""
        if not isinstance(self.client, RedisCluster):
            async with self.client.pipeline(transaction=False) as pipe:
                for command in commands:
                    pipe.execute_command(*command)
                pipe.wait(1, self.commit_replica_timeout_ms)
                return list(await pipe.execute())
        await self.client.initialize()  # its slot map, once (a no-op after the first call)
        asked: ClusterNode | None = None
        deadline = time.monotonic() + MIGRATION_PATIENCE_SECONDS
        for delay in _migration_backoff():
            node = asked or self.client.get_node_from_key(key)
            on_node = self.client.pipeline()
            if asked is not None:
                on_node.execute_command("ASKING", target_nodes=node)
            for command in commands:
                on_node.execute_command(*command, target_nodes=node)
            on_node.execute_command("WAIT", 1, self.commit_replica_timeout_ms, target_nodes=node)
            replies = list(await on_node.execute(raise_on_error=False, allow_redirections=False))
            replies = replies[1:] if asked is not None else replies
            error = next((reply for reply in replies if isinstance(reply, Exception)), None)
            asked = None
            if error is None:
                return replies
            if not isinstance(error, AskError | TryAgainError):
                raise error
            if time.monotonic() + delay > deadline:
                raise StoreUnavailable(f"Redis Cluster: this session's hash slot is still moving ({error})")
            if isinstance(error, MovedError):  # the slot has a new primary (a failover, a finished migration)
                await self.client.nodes_manager.move_slot(error)  # as redis-py does (connections.py)
            elif isinstance(error, AskError):  # the slot is migrating and these keys are already there
                asked = self.client.get_node(host=error.host, port=error.port)
            else:  # TRYAGAIN: the keys are split mid-migration; wait for the rest to move
                await asyncio.sleep(delay)
        raise AssertionError("unreachable")  # (the backoff never ends)

    def _not_replicated(self, turn_id: str) -> NotReplicated:
        return NotReplicated(
            f"no replica confirmed the commit within {self.commit_replica_timeout_ms} ms "
            "(ENGRAM_COMMIT_DURABILITY=replicated)",
            turn_id,
        )

    # --- whole-session operations (LlamaIndex chat-store semantics) -------------------------------------
    async def replace(
        self,
        tenant: str,
        session_id: str,
        messages: Sequence[NewMessage],
        policy: Policy | None = None,
        *,
        label: str = "",
    ) -> list[StoredMessage]:
        """Atomically replace the whole history (an empty list deletes the session)."""
        keys = self._session(tenant, session_id)
        policy = policy or Policy()
        args = self._message_args(messages)
        raw = await self._call_on_session(
            FN_REPLACE, keys, policy.session_ttl_seconds, policy.max_messages_per_session,
            session_id, label, len(messages), *args,
        )  # fmt: skip
        self.cache.discard(keys.log)
        return [_parse_entry(e) for e in raw[1]]

    async def insert_at(
        self,
        tenant: str,
        session_id: str,
        position: int,
        message: NewMessage,
        policy: Policy | None = None,
        *,
        label: str = "",
    ) -> None:
        """Insert ``message`` before the message at ``position``, atomically, as ``list.insert`` does
        (negative counts from the end, out of range clamps). Messages after it are re-added: O(those)."""
        keys = self._session(tenant, session_id)
        policy = policy or Policy()
        args = self._message_args([message])
        await self._call_on_session(
            FN_INSERT_AT, keys, position, policy.session_ttl_seconds, policy.max_messages_per_session,
            session_id, label, *args,
        )  # fmt: skip
        self.cache.discard(keys.log)

    async def delete_message_at(self, tenant: str, session_id: str, position: int) -> StoredMessage | None:
        """Delete the message at ``position`` (0 = oldest, -1 = newest); order and TTL of the rest stay."""
        keys = self._session(tenant, session_id)
        raw = await self._call_on_session(FN_DELETE_AT, keys, position, session_id)
        self.cache.discard(keys.log)
        return _parse_entry(raw[0]) if raw else None

    async def delete_session(self, tenant: str, session_id: str) -> bool:
        """Delete every key of the session, its index entry, its usage and its subject's link to it.
        Returns False when it did not exist."""
        keys = self._session(tenant, session_id)
        async with redis_errors():
            subject = await self.client.hget(keys.meta, "subject")
        subject_key = self.keys.subject(tenant, _text(subject)) if subject is not None else None
        raw = await self._call_on_session(FN_DELETE_SESSION, keys, session_id, subject_key=subject_key)
        self.cache.discard(keys.log)
        return int(raw) == 1

    async def erase_subject(self, tenant: str, subject: str) -> int:
        """Delete every session of ``subject`` (as :meth:`delete_session` does, so nothing of them stays:
        messages, archive, idempotency map, metadata, index entry, usage) and the subject's set. Passes
        repeat until the set is empty, so a session the subject started meanwhile goes too. Returns how
        many sessions were deleted."""
        subject_key = self.keys.subject(validate_tenant(tenant), validate_subject_id(subject))
        deleted = 0
        for _ in range(100):  # bounded: each pass empties what it saw; only a subject chatting on keeps it busy
            found = False
            cursor: int = 0
            while True:
                async with redis_errors():
                    cursor, members = await self.client.sscan(subject_key, cursor, count=200)
                for session_id in map(_text, members):
                    found = True
                    if not SESSION_ID_PATTERN.fullmatch(session_id):
                        continue
                    keys = self._session(tenant, session_id)
                    raw = await self._call_on_session(FN_DELETE_SESSION, keys, session_id, subject_key=subject_key)
                    self.cache.discard(keys.log)
                    deleted += int(raw)
                if cursor == 0:
                    break
            if not found:
                return deleted
        raise StoreUnavailable(f"subject {subject!r} kept gaining sessions while being erased; retry")

    async def check_rate(self, tenant: str, policy: Policy) -> None:
        """Count one request of ``tenant`` against its rate (:class:`RateLimited` when over it). Turns do
        not call this: their load counts them in the same round trip."""
        if policy.requests_per_second <= 0:
            return
        rate = self.keys.rate(validate_tenant(tenant))
        burst = policy.effective_burst
        await self._call(lambda: self.client.fcall(FN_RATE, 1, rate, policy.requests_per_second, burst))

    async def usage(self, tenant: str) -> Usage:
        """The tenant's stored bytes and live sessions, as its quotas count them (expired ones swept out)."""
        tenant = validate_tenant(tenant)
        keys = (self.keys.usage(tenant), self.keys.session_expiry(tenant))
        stored_bytes, sessions = await self._call(lambda: self.client.fcall(FN_USAGE, 2, *keys))
        return Usage(int(stored_bytes), int(sessions))

    async def export(self, tenant: str, session_id: str, *, batch: int = 500) -> AsyncIterator[ExportedMessage]:
        """Every message of the session, oldest first: the archived ones, then the log. Reads ``batch``
        entries per round trip and holds no more, so exporting any length takes constant memory."""
        keys = self._session(tenant, session_id)
        for archived, stream in ((True, keys.archive), (False, keys.log)):
            start = "-"
            while True:
                async with redis_errors():
                    entries = await self.client.xrange(stream, min=start, max="+", count=batch) or []
                for entry in entries:
                    yield ExportedMessage(_parse_entry(entry), archived)
                if len(entries) < batch:
                    break
                start = "(" + _text(entries[-1][0])

    async def exists(self, tenant: str, session_id: str) -> bool:
        """Whether the session has any keys (messages, archive or metadata)."""
        keys = self._session(tenant, session_id)
        async with redis_errors():
            return int(await self.client.exists(keys.log, keys.meta, keys.archive)) > 0

    async def take_oldest(self, tenant: str, session_id: str, count: int, *, archive: bool) -> list[StoredMessage]:
        """Remove the ``count`` oldest messages atomically; with ``archive`` move them to the
        session's archive stream (LlamaIndex Memory's archive_oldest_messages)."""
        keys = self._session(tenant, session_id)
        mode = "archive" if archive else "delete"
        raw = await self._call_on_session(FN_TAKE_OLDEST, keys, count, mode, session_id)
        return [_parse_entry(e) for e in raw]

    async def all_messages(
        self, tenant: str, session_id: str, *, archived: bool = False, offset: int = 0, limit: int | None = None
    ) -> list[StoredMessage]:
        """Messages oldest first, from the log or the archive (LlamaIndex's get_messages; not on the
        hot path: it reads the whole range asked for)."""
        keys = self._session(tenant, session_id)
        count = None if limit is None else offset + limit
        async with redis_errors():
            entries = await self.client.xrange(keys.archive if archived else keys.log, count=count) or []
        return [_parse_entry(e) for e in entries[offset:]]

    async def delete_archive(self, tenant: str, session_id: str) -> None:
        keys = self._session(tenant, session_id)
        async with redis_errors():
            await self.client.delete(keys.archive)

    async def last_messages(self, tenant: str, session_id: str, count: int) -> list[StoredMessage]:
        """The newest ``count`` messages, oldest first, whatever their tokens."""
        keys = self._session(tenant, session_id)
        async with redis_errors():
            entries = await self.client.xrevrange(keys.log, count=count) or []
        return [_parse_entry(e) for e in reversed(entries)]

    async def count_messages(self, tenant: str, session_id: str, *, archived: bool = False) -> int:
        keys = self._session(tenant, session_id)
        async with redis_errors():
            return int(await self.client.xlen(keys.archive if archived else keys.log))

    async def messages(
        self, tenant: str, session_id: str, *, limit: int = 100, cursor: str | None = None
    ) -> MessagePage:
        """One page of messages, oldest first. ``cursor`` is the previous page's ``next_cursor``."""
        keys = self._session(tenant, session_id)
        if not 1 <= limit <= 1000:
            raise InvalidMessage("limit must be between 1 and 1000")
        start = "-" if cursor is None else "(" + _decode_stream_cursor(cursor)
        async with redis_errors():
            entries = await self.client.xrange(keys.log, min=start, max="+", count=limit + 1) or []
        page = [_parse_entry(e) for e in entries[:limit]]
        next_cursor = _encode_cursor(page[-1].id) if len(entries) > limit else None
        return MessagePage(page, next_cursor)

    # --- tenant-wide operations -----------------------------------------------------------------------
    async def list_sessions(self, tenant: str, *, limit: int = 100, cursor: str | None = None) -> SessionPage:
        """A page of the tenant's sessions in id order, from the session index (never KEYS or SCAN).

        Sessions without messages are skipped; those whose log is gone (deleted or expired) are then
        pruned from the index by one function call that re-checks each log when it runs, so a session
        re-created since this page was read keeps its entry.
        """
        index = self.keys.session_index(validate_tenant(tenant))
        if not 1 <= limit <= 1000:
            raise InvalidMessage("limit must be between 1 and 1000")
        start = "-" if cursor is None else "(" + _decode_cursor(cursor, SESSION_ID_PATTERN)
        async with redis_errors():
            members = await self.client.zrange(index, start, "+", bylex=True, offset=0, num=limit + 1)
        ids = [_text(m) for m in members]
        page_ids = ids[:limit]
        # An index entry that is not a valid id has no keys: skip it (the purge removes it with the index).
        valid = [self.keys.session(tenant, s) for s in page_ids if SESSION_ID_PATTERN.fullmatch(s)]
        async with redis_errors():
            async with self.client.pipeline(transaction=False) as pipe:
                for keys in valid:
                    pipe.xlen(keys.log)
                    pipe.hget(keys.meta, "updated")
                    pipe.hget(keys.meta, "key")
                replies = await pipe.execute()
        sessions: list[SessionInfo] = []
        empty: list[SessionKeys] = []
        for i, keys in enumerate(valid):
            count, updated, label = replies[3 * i : 3 * i + 3]
            if not count:
                empty.append(keys)
                continue
            info = SessionInfo(keys.session_id, int(count), int(_text(updated) or 0) / 1000.0)
            sessions.append(dataclasses.replace(info, label=_text(label)) if label is not None else info)
        if empty:
            await self._prune_index(index, empty)
        next_cursor = _encode_cursor(page_ids[-1]) if len(ids) > limit else None
        return SessionPage(sessions, next_cursor)

    async def _prune_index(self, index: str, sessions: Sequence[SessionKeys]) -> int:
        """Unindex those of ``sessions`` whose log does not exist, checked atomically with the removal.

        Not a ZREM of what the listing saw: a session deleted and re-created in between would lose its
        entry, drop out of every listing and out of an index-driven purge until its next turn.
        """
        logs = [keys.log for keys in sessions]
        ids = [keys.session_id for keys in sessions]
        return int(await self._call(lambda: self.client.fcall(FN_PRUNE_INDEX, 1 + len(logs), index, *logs, *ids)))

    async def session_ids(self, tenant: str) -> list[str]:
        """Every live session id of the tenant, page by page from the index."""
        return [s.session_id for s in await self.all_sessions(tenant)]

    async def all_sessions(self, tenant: str) -> list[SessionInfo]:
        """Every live session of the tenant, page by page from the index."""
        sessions: list[SessionInfo] = []
        cursor: str | None = None
        while True:
            page = await self.list_sessions(tenant, limit=1000, cursor=cursor)
            sessions += page.sessions
            if page.next_cursor is None:
                return sessions
            cursor = page.next_cursor

    async def count_sessions(self, tenant: str) -> int:
        """Sessions in the tenant's index (may include some that expired and were not pruned yet)."""
        async with redis_errors():
            return int(await self.client.zcard(self.keys.session_index(validate_tenant(tenant))))

    async def _scan_batches(self, pattern: str, batch: int) -> AsyncIterator[list[str]]:
        """The names of keys matching ``pattern``, a batch at a time (SCAN; on a Cluster every primary's)."""
        if isinstance(self.client, RedisCluster):
            names: list[str] = []
            async with redis_errors():
                async for name in self.client.scan_iter(match=pattern, count=batch):
                    names.append(_text(name))
            for start in range(0, len(names), batch):
                yield names[start : start + batch]
            return
        cursor: int = 0
        while True:
            async with redis_errors():
                cursor, found = await self.client.scan(cursor, match=pattern, count=batch)
            if found:
                yield [_text(name) for name in found]
            if cursor == 0:
                return

    async def purge_tenant(self, tenant: str, *, batch: int = 100) -> int:
        """Delete every key of ``tenant`` (its sessions and its session index). Returns how many
        sessions had keys.

        The keys are found with ``SCAN MATCH <tenant prefix>*``, not from the index: erasure must not
        depend on the index being complete. So this needs a Redis user allowed to SCAN: the operator's
        or the CLI's admin user, never a tenant's. Passes repeat until one finds nothing, so keys
        written during a pass (a turn in flight when the tenant was revoked) go too.
        """
        pattern = self.keys.tenant_key_pattern(validate_tenant(tenant))
        purged: set[str] = set()
        while True:
            found = 0
            async for names in self._scan_batches(pattern, batch):
                async with redis_errors():
                    await self.client.delete(*names)
                found += len(names)
                for name in names:
                    session_id = self.keys.session_id_of(tenant, name)
                    if session_id is not None:
                        purged.add(session_id)
                        self.cache.discard(self.keys.session(tenant, session_id).log)
            if not found:
                return len(purged)
