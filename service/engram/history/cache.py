"""The per-process cache of session tails, and the pure logic that merges a load's reply into it.

The cache never answers on its own: every load asks Redis "what changed after the last message I hold,
under this epoch?" in the same single call that returns those changes. So a cached tail can make a
load cheaper, never stale.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from cachetools import LRUCache

from engram.messages import CacheOutcome, StoredMessage, stream_id_key

# Roles that cannot open a window: a window starting with an assistant or tool message has lost the
# message it answers (ChatMemoryBuffer drops them the same way).
_NOT_OPENING_ROLES = frozenset({"assistant", "tool", "function"})


@dataclass(frozen=True, slots=True)
class CachedTail:
    epoch: str  # changes whenever the session is rewritten, deleted or recreated
    last_id: str  # newest message id seen (may be newer than messages[-1] if it did not fit)
    messages: tuple[StoredMessage, ...]  # the newest messages fitting `budget`, oldest first
    budget: int
    complete: bool  # messages start at the session's first message: valid for any larger budget too


@dataclass(frozen=True, slots=True)
class LoadRequest:
    """What to send: the cached epoch and last id, or empty strings to ask for a full window."""

    epoch: str
    after_id: str

    @classmethod
    def for_tail(cls, tail: CachedTail | None, budget: int) -> LoadRequest:
        if tail is None or (tail.budget < budget and not tail.complete):
            return cls("", "")
        return cls(tail.epoch, tail.last_id)


@dataclass(frozen=True, slots=True)
class LoadReply:
    epoch: str  # '' when the session does not exist
    first_id: str  # oldest message still stored
    complete: bool  # the entries reach back to after_id (or the session start)
    entries_newest_first: Sequence[StoredMessage]


def fit_budget(messages: Sequence[StoredMessage], budget: int) -> list[StoredMessage]:
    """The newest messages whose tokens add up to at most ``budget``, oldest first."""
    kept: list[StoredMessage] = []
    used = 0
    for message in reversed(messages):
        if used + message.tokens > budget:
            break
        used += message.tokens
        kept.append(message)
    kept.reverse()
    return kept


def drop_unanswerable_start(messages: list[StoredMessage]) -> list[StoredMessage]:
    start = 0
    while start < len(messages) and messages[start].role in _NOT_OPENING_ROLES:
        start += 1
    return messages[start:]


def merge(
    request: LoadRequest, tail: CachedTail | None, reply: LoadReply, budget: int
) -> tuple[CacheOutcome, CachedTail | None]:
    """Combine the cached tail with what Redis returned. Returns the outcome and the new tail
    (None when the session does not exist)."""
    if not reply.epoch:
        return "miss", None
    new = list(reversed(reply.entries_newest_first))
    validated = tail is not None and request.after_id != "" and reply.epoch == tail.epoch
    if validated and tail is not None:
        if not new:
            outcome: CacheOutcome = "hit"
            candidates = list(tail.messages)
        else:
            outcome = "delta"
            candidates = new
            if reply.complete:  # the new entries reach back to the cached ones: join them
                candidates = list(tail.messages) + new
        # Retention may have trimmed the oldest cached messages since they were read.
        first_key = stream_id_key(reply.first_id) if reply.first_id else (0, 0)
        candidates = [m for m in candidates if stream_id_key(m.id) >= first_key]
        last_id = new[-1].id if new else tail.last_id
    else:
        outcome = "miss"
        candidates = new
        last_id = new[-1].id if new else ""
    window = fit_budget(candidates, budget)
    complete = bool(window) and window[0].id == reply.first_id
    if not window and not candidates:
        complete = reply.complete and not request.after_id
    return outcome, CachedTail(reply.epoch, last_id, tuple(window), budget, complete)


class TailCache:
    """A bounded LRU of session tails, keyed by the session's log key. Size 0 disables caching."""

    def __init__(self, max_sessions: int) -> None:
        self._tails: LRUCache[str, CachedTail] | None = LRUCache(max_sessions) if max_sessions > 0 else None

    def get(self, key: str) -> CachedTail | None:
        return self._tails.get(key) if self._tails is not None else None

    def put(self, key: str, tail: CachedTail | None) -> None:
        if self._tails is None:
            return
        if tail is None or not tail.last_id:
            self._tails.pop(key, None)
            return
        current = self._tails.get(key)
        # Two loads of one session may finish out of order: never replace a newer tail by an older one.
        if (
            current is not None
            and current.epoch == tail.epoch
            and stream_id_key(current.last_id) > stream_id_key(tail.last_id)
        ):
            return
        self._tails[key] = tail

    def extend(self, key: str, epoch: str, previous_id: str, committed: Sequence[StoredMessage], budget: int) -> None:
        """After a commit: if the cached tail ended exactly where the commit began (or the commit
        opened the session), append the committed messages, so the tail still equals what Redis
        holds and the next load is a hit."""
        if self._tails is None or not committed:
            return
        tail = self._tails.get(key)
        if tail is None and previous_id == "":  # this commit wrote the session's first messages
            tail = CachedTail(epoch, "", (), budget, complete=True)
        if tail is None or tail.epoch != epoch or tail.last_id != previous_id:
            return
        joined = list(tail.messages) + list(committed)
        window = fit_budget(joined, tail.budget)
        complete = tail.complete and len(window) == len(joined)
        self._tails[key] = CachedTail(epoch, committed[-1].id, tuple(window), tail.budget, complete)

    def discard(self, key: str) -> None:
        if self._tails is not None:
            self._tails.pop(key, None)
