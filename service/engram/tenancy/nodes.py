"""The Redis nodes tenancy changes are applied to: the primary, and replicas for ACL users.

Data (registry records, sessions, the function library) is written to the primary only and reaches
replicas by replication. ACL users are not replicated, so they are set on every node.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import redis.asyncio as aioredis

from engram.connections import create_redis
from engram.settings import Settings


def node_name(client: aioredis.Redis) -> str:
    """``host:port`` (or the socket path) of a client, for messages: never its credentials."""
    kwargs = client.connection_pool.connection_kwargs
    if kwargs.get("path"):
        return str(kwargs["path"])
    return f"{kwargs.get('host', '?')}:{kwargs.get('port', '?')}"


def split_urls(value: str | None) -> list[str]:
    """``"redis://a:6379, redis://b:6379"`` -> two URLs; empty or None -> none."""
    return [url.strip() for url in (value or "").split(",") if url.strip()]


@dataclass
class RedisNodes:
    primary: aioredis.Redis
    replicas: tuple[aioredis.Redis, ...] = ()
    # Per node, the allow-list filtered to the commands that server knows (see acl.supported_commands).
    supported: dict[str, tuple[str, ...]] = field(default_factory=dict)

    @property
    def all(self) -> tuple[aioredis.Redis, ...]:
        return (self.primary, *self.replicas)

    @classmethod
    def from_settings(
        cls, settings: Settings, redis_url: str | None = None, replica_urls: list[str] | None = None
    ) -> RedisNodes:
        """Clients with the settings' (admin) credentials for the primary and each replica."""
        replicas = split_urls(settings.redis_replica_urls) if replica_urls is None else replica_urls
        return cls(
            primary=create_redis(settings, redis_url),
            replicas=tuple(create_redis(settings, url) for url in replicas),
        )

    async def aclose(self) -> None:
        for client in self.all:
            await client.aclose()
