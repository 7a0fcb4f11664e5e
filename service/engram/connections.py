"""Redis clients configured the way Engram expects: bounded timeouts, so an unreachable Redis turns
into a clear error (HTTP 503) instead of a hang, and a burst waits for a connection instead of failing."""

from __future__ import annotations

from typing import Any

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff
from redis.exceptions import ConnectionError as RedisConnectionError

from engram.settings import Settings


def create_redis(settings: Settings, url: str | None = None) -> aioredis.Redis:
    """An asyncio Redis client (one connection pool) for ``url`` or ``settings.redis_url``."""
    password = settings.redis_password.get_secret_value() if settings.redis_password else None
    # Explicit credentials override the URL's; from_url only takes them as keyword arguments.
    credentials: dict[str, Any] = {
        key: value for key, value in (("username", settings.redis_username), ("password", password)) if value
    }
    # A blocking pool: a burst above max_connections waits (up to redis_pool_timeout) for a connection
    # to come back instead of failing at once with MaxConnectionsError.
    pool = aioredis.BlockingConnectionPool.from_url(
        url or settings.redis_url,
        max_connections=settings.redis_max_connections,
        timeout=settings.redis_pool_timeout,
        decode_responses=True,
        socket_timeout=settings.redis_socket_timeout,
        socket_connect_timeout=settings.redis_connect_timeout,
        health_check_interval=30,
        # One quick retry covers a dropped idle connection. Timeouts are not retried: a hung Redis
        # must turn into a 503 after one socket timeout, not two.
        retry=Retry(ExponentialBackoff(cap=0.1, base=0.01), retries=1, supported_errors=(RedisConnectionError,)),
        client_name="engram",
        **credentials,
    )
    return aioredis.Redis.from_pool(pool)
