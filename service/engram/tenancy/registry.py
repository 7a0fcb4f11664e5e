"""Resolving API keys to tenants, for the chat service (one call per request).

The key names its tenant (``egk_<tenant>.<secret>``), so a lookup is one ``HGETALL`` of that tenant's
registry record and a constant-time compare of SHA-256 digests. Results, positive and negative, are kept
for ``cache_seconds``: a deleted tenant or a rotated key stops working within that window, and a client
hammering with a wrong key costs Redis one lookup per window, not one per request.
"""

from __future__ import annotations

import hmac
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import redis.asyncio as aioredis
from cachetools import TTLCache
from redis.exceptions import RedisError

from engram.connections import RedisClient
from engram.errors import StoreUnavailable
from engram.policy import Tenant
from engram.redis_keys import KeySpace
from engram.tenancy.apikeys import hash_secret, parse_api_key
from engram.tenancy.records import InvalidRecord, TenantRecord, decode_hash

log = logging.getLogger(__name__)

T = TypeVar("T")
DEFAULT_CACHE_ENTRIES = 10_000


async def redis_call(make_call: Callable[[], Awaitable[T]], what: str) -> T:
    """Run one Redis call; any Redis failure becomes :class:`StoreUnavailable` (HTTP 503 upstream)."""
    try:
        return await make_call()
    except (RedisError, OSError) as error:
        raise StoreUnavailable(f"Redis is unavailable ({what}): {type(error).__name__}: {error}") from error


async def read_record(redis: RedisClient, keys: KeySpace, tenant: str) -> TenantRecord | None:
    """The tenant's registry record, or None when there is none.

    Raises :class:`InvalidRecord` for a hash that does not parse and :class:`StoreUnavailable` when
    Redis cannot be reached.
    """
    raw: dict[Any, Any] = await redis_call(lambda: redis.hgetall(keys.tenant_record(tenant)), "read tenant")
    if not raw:
        return None
    return TenantRecord.from_hash(decode_hash(raw))


class TenantRegistry:
    """Resolves API keys to :class:`~engram.messages.Tenant` (name and memory policy)."""

    def __init__(
        self,
        redis: aioredis.Redis,
        keys: KeySpace,
        cache_seconds: float = 2.0,
        *,
        max_entries: int = DEFAULT_CACHE_ENTRIES,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.redis = redis
        self.keys = keys
        self.cache_seconds = cache_seconds
        # Keyed by the key's digest, so the cache holds no usable credentials.
        self._cache: TTLCache[str, Tenant | None] | None = (
            TTLCache(maxsize=max_entries, ttl=cache_seconds, timer=clock) if cache_seconds > 0 else None
        )

    async def resolve_api_key(self, api_key: str) -> Tenant | None:
        """The tenant ``api_key`` belongs to, or None for a wrong, malformed, rotated or deleted key.

        Raises :class:`~engram.errors.StoreUnavailable` when Redis cannot be reached.
        """
        parsed = parse_api_key(api_key)
        if parsed is None:
            return None  # malformed: decided without Redis, nothing worth caching
        digest = hash_secret(api_key)
        if self._cache is not None:
            try:
                return self._cache[digest]
            except KeyError:
                pass
        tenant = await self._lookup(parsed.tenant, digest)
        if self._cache is not None:
            self._cache[digest] = tenant
        return tenant

    async def _lookup(self, tenant: str, digest: str) -> Tenant | None:
        try:
            record = await read_record(self.redis, self.keys, tenant)
        except InvalidRecord as error:
            log.warning("tenant %s has an unreadable registry record, refusing its keys: %s", tenant, error)
            return None
        if record is None:
            return None
        if not hmac.compare_digest(record.api_key_sha256.encode(), digest.encode()):
            return None
        return Tenant(name=record.tenant, policy=record.policy)

    def clear_cache(self) -> None:
        """Forget every cached answer (the next lookups go to Redis)."""
        if self._cache is not None:
            self._cache.clear()
