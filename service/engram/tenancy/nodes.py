"""The Redis nodes tenancy changes are applied to: the primary, and replicas for ACL users.

Data (registry records, sessions, the function library) is written to the primary only and reaches
replicas by replication. ACL users are not replicated, so they are set on every node:

- standalone: the primary (``ENGRAM_REDIS_URL``) and ``ENGRAM_REDIS_REPLICA_URLS``;
- sentinel: whatever the Sentinels list now (the primary and every replica not down), asked again on each
  change, so a replica promoted or added later gets the users at the operator's next drift repair;
- cluster: every node of the cluster's slot map now (primaries and replicas), read again on each change, so
  nodes added or promoted later get the users too. Data goes through the Cluster client (:attr:`primary`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import redis.asyncio as aioredis
from redis.asyncio.cluster import RedisCluster

from engram.connections import (
    RedisClient,
    cluster_nodes,
    create_redis,
    primary_address,
    sentinel_nodes,
    sentinel_pool,
)
from engram.settings import Settings


def node_name(client: RedisClient) -> str:
    """``host:port`` (or the socket path) of a client, for messages: never its credentials."""
    return "the cluster" if isinstance(client, RedisCluster) else primary_address(client)


def split_urls(value: str | None) -> list[str]:
    """``"redis://a:6379, redis://b:6379"`` -> two URLs; empty or None -> none."""
    return [url.strip() for url in (value or "").split(",") if url.strip()]


@dataclass
class RedisNodes:
    primary: RedisClient  # the primary, the Sentinels' primary or a Cluster client
    replicas: tuple[aioredis.Redis, ...] = ()
    # Per node, the allow-list filtered to the commands that server knows (see acl.supported_commands).
    supported: dict[str, tuple[str, ...]] = field(default_factory=dict)
    # Sentinel mode: the settings to reach each node the Sentinels name, and one client per node seen.
    settings: Settings | None = None
    discovered: dict[str, aioredis.Redis] = field(default_factory=dict)

    @property
    def all(self) -> tuple[aioredis.Redis, ...]:
        """The configured nodes (standalone). In sentinel and cluster mode use :meth:`every_node`."""
        if isinstance(self.primary, RedisCluster):  # one client for many nodes: ACL commands need each node
            raise TypeError("a Redis Cluster's nodes are found by every_node(), not configured")
        return (self.primary, *self.replicas)

    async def every_node(self) -> tuple[aioredis.Redis, ...]:
        """Every node an ACL user must exist on, now. Sentinel mode asks the Sentinels (raises
        :class:`redis.exceptions.ConnectionError` when none answers with a primary)."""
        if self.settings is None:
            return self.all
        cluster = await cluster_nodes(self.primary)
        if cluster is not None:
            return self._node_clients(cluster, 0)
        topology = await sentinel_nodes(self.primary)
        if topology is None:
            return self.all
        primary, replicas = topology
        pool = sentinel_pool(self.primary)
        return self._node_clients([primary, *replicas], pool.connection_kwargs.get("db", 0) if pool else 0)

    def _node_clients(self, addresses: list[tuple[str, int]], db: int) -> tuple[aioredis.Redis, ...]:
        """One client per node address (kept for the next call), with the settings' credentials."""
        assert self.settings is not None
        clients = []
        for host, port in addresses:
            address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
            if address not in self.discovered:
                self.discovered[address] = create_redis(self.settings, f"redis://{address}/{db}")
            clients.append(self.discovered[address])
        return tuple(clients)

    @classmethod
    def from_settings(
        cls, settings: Settings, redis_url: str | None = None, replica_urls: list[str] | None = None
    ) -> RedisNodes:
        """Clients with the settings' (admin) credentials for the primary and each replica; in sentinel
        mode (and without an explicit ``redis_url``) the primary follows failovers."""
        replicas = split_urls(settings.redis_replica_urls) if replica_urls is None else replica_urls
        return cls(
            primary=create_redis(settings, redis_url),
            replicas=tuple(create_redis(settings, url) for url in replicas),
            settings=settings,
        )

    async def aclose(self) -> None:
        for client in (self.primary, *self.replicas, *self.discovered.values()):
            await client.aclose()
