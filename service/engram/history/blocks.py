"""The Redis side of durable memory blocks: a session's facts and other blocks' state, shared by every process.

Two keys per session, in the session's hash tag (see :meth:`engram.redis_keys.KeySpace.memory_blocks`):

- ``...:facts``, a sorted set holding the facts of every fact-extraction block of the session. A member is
  ``"<block id>:<fact>"`` (the block id is the block's name mapped like a session id, so it has no ``:``),
  scored by the Redis server's clock in microseconds when it was first added: facts read back in the order
  they were learnt, whichever replica learnt them.
- ``...:blocks``, a hash ``<block id> -> JSON`` for the state of other blocks (a static block's content).

Why these operations (and no read-modify-write of a whole list, which loses what another replica wrote in
between):

- Adding facts is one ``ZADD NX``: additive (it never removes anything), idempotent (a fact already there
  keeps its place, as LlamaIndex's ``if fact not in facts`` does), and atomic per call. Concurrent
  extractions on one session lose nothing and need no retry.
- A condensation replaces the facts it read by fewer facts: a compare-and-set under ``WATCH``. It commits
  only while every fact it read is still there; facts other processes added meanwhile are kept after the
  condensed ones (so they are not lost either), unless that would leave more than the bound, in which case
  the caller condenses again from what is there now. ``WATCH`` aborts the ``MULTI`` if anything touched the
  key between the check and the write; that retry costs Redis round trips only, never another model call.
- Tenant users may not run EVAL, and Engram's function library is left alone, so the compare-and-set is
  ``WATCH``/``MULTI``/``EXEC`` (in the tenant allow-list; all keys in one slot, so it works on a cluster).

TTL: every write sets the session's TTL on the key (``PERSIST`` when it is 0). A read refreshes it when less
than 90% of it is left: blocks live at least 0.9 × TTL after the session's memory was last read and a full
TTL after the last write, while a read costs no write most of the time.
"""

from __future__ import annotations

import enum
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from redis.exceptions import WatchError

from engram.connections import RedisClient
from engram.history.store import redis_errors
from engram.redis_keys import SESSION_ID_PATTERN, BlockKeys, KeySpace

log = logging.getLogger(__name__)

REFRESH_BELOW = 0.9
"""A read refreshes a key's TTL when less than this share of the session's TTL is left."""
CAS_ATTEMPTS = 50
"""How often a condensation re-checks after WATCH saw the key change (Redis round trips only)."""


@dataclass(frozen=True, slots=True)
class Fact:
    text: str
    score: float  # server time (µs) it was first added; order of the facts


class Condensed(enum.Enum):
    """What :meth:`BlockState.replace_facts` did."""

    REPLACED = "replaced"  # the condensed facts (plus any added meanwhile) are stored, within the bound
    CHANGED = "changed"  # some fact that was read is gone (another process condensed): nothing written
    OVER_BOUND = "over_bound"  # facts added meanwhile would leave more than the bound: nothing written


def _member_prefix(block_id: str) -> str:
    if not SESSION_ID_PATTERN.fullmatch(block_id):
        raise ValueError(f"invalid block id {block_id!r}")
    return f"{block_id}:"


def _unique(texts: Sequence[str]) -> list[str]:
    return list(dict.fromkeys(texts))


class BlockState:
    """Memory blocks' state of every session of one Redis (``client`` decodes responses, as
    :func:`engram.connections.create_redis` makes it)."""

    def __init__(self, client: RedisClient, keys: KeySpace) -> None:
        self.client = client
        self.keys = keys

    def _keys(self, tenant: str, session_id: str) -> BlockKeys:
        return self.keys.memory_blocks(tenant, session_id)

    @staticmethod
    def _expire(pipe: Any, key: str, ttl: int) -> None:
        if ttl > 0:
            pipe.expire(key, ttl)
        else:
            pipe.persist(key)

    async def _refresh(self, key: str, left: int, ttl: int) -> None:
        """Give ``key`` the session's TTL again if a read found less than :data:`REFRESH_BELOW` of it left
        (``left``: its TTL as Redis reported it; -2 missing, -1 none)."""
        stale = (ttl > 0 and -1 <= left < ttl * REFRESH_BELOW) or (ttl == 0 and left >= 0)
        if stale and left != -2:
            await (self.client.expire(key, ttl) if ttl > 0 else self.client.persist(key))

    # --- facts ------------------------------------------------------------------------------------------
    @staticmethod
    def _facts_of(block_id: str, entries: Sequence[tuple[str, float]]) -> list[Fact]:
        prefix = _member_prefix(block_id)
        return [Fact(member[len(prefix) :], score) for member, score in entries if member.startswith(prefix)]

    async def facts(self, tenant: str, session_id: str, block_id: str, ttl: int) -> list[Fact]:
        """The block's facts, oldest first (one round trip; a second, rarely, to refresh the TTL)."""
        key = self._keys(tenant, session_id).facts
        async with redis_errors():
            async with self.client.pipeline(transaction=False) as pipe:
                pipe.zrange(key, 0, -1, withscores=True)
                pipe.ttl(key)
                entries, left = await pipe.execute()
            await self._refresh(key, left, ttl)
        return self._facts_of(block_id, entries)

    async def add_facts(self, tenant: str, session_id: str, block_id: str, texts: Sequence[str], ttl: int) -> int:
        """Add the facts not there yet (``ZADD NX``: additive, idempotent); returns how many facts the block
        holds now. Two round trips: the server's clock, then the write."""
        key = self._keys(tenant, session_id).facts
        prefix = _member_prefix(block_id)
        texts = _unique(texts)
        async with redis_errors():
            seconds, micros = await self.client.time()
            now = seconds * 1_000_000 + micros
            async with self.client.pipeline(transaction=False) as pipe:
                if texts:
                    pipe.zadd(key, {prefix + text: now + n for n, text in enumerate(texts)}, nx=True)
                    self._expire(pipe, key, ttl)
                pipe.zrange(key, 0, -1)
                replies = await pipe.execute()
        return sum(1 for member in replies[-1] if member.startswith(prefix))

    async def replace_facts(
        self,
        tenant: str,
        session_id: str,
        block_id: str,
        read: Sequence[Fact],
        condensed: Sequence[str],
        max_facts: int,
        ttl: int,
    ) -> Condensed:
        """Compare-and-set: replace the facts in ``read`` by ``condensed`` if all of ``read`` is still there.

        Facts added since ``read`` stay, after the condensed ones, if the result fits ``max_facts``. The
        condensed facts take the places (scores) from the oldest fact read on, so they stay older than any
        fact learnt later.
        """
        key = self._keys(tenant, session_id).facts
        prefix = _member_prefix(block_id)
        read_texts = {fact.text for fact in read}
        start = min((fact.score for fact in read), default=0.0)
        async with redis_errors():
            for _ in range(CAS_ATTEMPTS):
                async with self.client.pipeline(transaction=True) as pipe:
                    await pipe.watch(key)
                    entries: Any = await pipe.zrange(key, 0, -1, withscores=True)
                    now = self._facts_of(block_id, entries)
                    if not read_texts <= {fact.text for fact in now}:
                        return Condensed.CHANGED
                    added = [fact for fact in now if fact.text not in read_texts]
                    kept = _unique([*condensed, *(fact.text for fact in added)])
                    if len(kept) > max_facts:
                        return Condensed.OVER_BOUND
                    scores = {text: start + n for n, text in enumerate(_unique(condensed))}
                    scores.update({fact.text: fact.score for fact in added})
                    pipe.multi()  # type: ignore[no-untyped-call]
                    if now:
                        pipe.zrem(key, *(prefix + fact.text for fact in now))
                    pipe.zadd(key, {prefix + text: scores[text] for text in kept})
                    self._expire(pipe, key, ttl)
                    try:
                        await pipe.execute()
                    except WatchError:
                        continue
                    return Condensed.REPLACED
        log.warning("facts of %s/%s changed %d times during one condensation", tenant, session_id, CAS_ATTEMPTS)
        return Condensed.CHANGED

    async def clear_facts(self, tenant: str, session_id: str, block_id: str) -> int:
        """Remove the block's facts (only this block's); returns how many there were."""
        key = self._keys(tenant, session_id).facts
        prefix = _member_prefix(block_id)
        async with redis_errors():
            every: list[str] = await self.client.zrange(key, 0, -1)  # type: ignore[assignment]
            members = [member for member in every if member.startswith(prefix)]
            return int(await self.client.zrem(key, *members)) if members else 0

    async def delete(self, tenant: str, session_id: str) -> int:
        """Delete every block's state of the session (both keys); returns how many keys existed."""
        async with redis_errors():
            return int(await self.client.delete(*self._keys(tenant, session_id).all()))

    # --- other blocks' state ------------------------------------------------------------------------------
    async def state(self, tenant: str, session_id: str, block_id: str, ttl: int) -> str | None:
        """The block's stored state (JSON), or None if it was never set."""
        key = self._keys(tenant, session_id).blocks
        async with redis_errors():
            async with self.client.pipeline(transaction=False) as pipe:
                pipe.hget(key, block_id)
                pipe.ttl(key)
                value, left = await pipe.execute()
            await self._refresh(key, left, ttl)
        return value if value is None else str(value)

    async def set_state(self, tenant: str, session_id: str, block_id: str, value: str | None, ttl: int) -> None:
        """Store the block's state (one atomic field write: the last writer wins); None removes it."""
        key = self._keys(tenant, session_id).blocks
        async with redis_errors():
            async with self.client.pipeline(transaction=False) as pipe:
                if value is None:
                    pipe.hdel(key, block_id)
                else:
                    pipe.hset(key, block_id, value)
                    self._expire(pipe, key, ttl)
                await pipe.execute()
