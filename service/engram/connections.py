"""Redis clients configured the way Engram expects: bounded timeouts, so an unreachable Redis turns
into a clear error (HTTP 503) instead of a hang, and a burst waits for a connection instead of failing.

Three topologies, one entry point (:func:`create_redis`), chosen by ``ENGRAM_REDIS_MODE``:

- ``standalone``: ``ENGRAM_REDIS_URL`` is the primary.
- ``sentinel``: redis-py's own asyncio Sentinel client asks ``ENGRAM_REDIS_SENTINELS`` for the primary of
  ``ENGRAM_REDIS_SENTINEL_SERVICE`` whenever it opens a connection, and drops connections to a primary
  that was demoted (``-READONLY``): after a failover the next connection goes to the promoted replica.
  Nothing here decides a failover; the Sentinels do.
- ``cluster``: redis-py's own asyncio ``RedisCluster`` starts from the seed node in ``ENGRAM_REDIS_URL``,
  learns the slot map and follows ``MOVED``/``ASK`` redirects and failovers itself. Keys then carry the
  tenant's hash tag (:func:`key_space`), so every Engram function call is single-slot.

The library (``store_from_url``) names a Sentinel topology with a URL of its own,
``redis+sentinel://[user[:password]@]host:port[,host:port...]/<service>[/<db>]``, so that a serialized
adapter reconnects through the Sentinels too (:func:`sentinel_url_of`); a Cluster is
``redis+cluster://[user[:password]@]host:port[,host:port...]`` (any seed nodes).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote, urlsplit

import redis.asyncio as aioredis
from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.asyncio.retry import Retry
from redis.asyncio.sentinel import Sentinel, SentinelConnectionPool
from redis.backoff import ExponentialBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisClusterException

from engram.redis_keys import KeySpace
from engram.settings import Settings, parse_host_ports

SENTINEL_SCHEME = "redis+sentinel"
CLUSTER_SCHEME = "redis+cluster"

# Any of Engram's clients: one node (standalone, or the Sentinels' primary) or a Redis Cluster.
RedisClient = aioredis.Redis | RedisCluster


class EngramRedisCluster(RedisCluster):
    """redis-py's asyncio cluster client, told where an ``FCALL``'s keys are.

    redis-py finds the keys of commands with movable keys by asking the server (``COMMAND GETKEYS``, a
    round trip of its own before every call); it reads them from the arguments only for EVAL/EVALSHA.
    ``FCALL fn numkeys key...`` has the same shape, so it is read the same way: a turn stays two round trips.
    """

    # what it was made from: settings, seed nodes, credentials (clone_cluster_client)
    engram_made_from: tuple[Settings, ClusterTarget, dict[str, Any]]

    async def _determine_slot(self, command: str, *args: Any) -> int:
        if command.upper() in ("FCALL", "FCALL_RO") and len(args) >= 2 and int(args[1]) > 0:
            slots = {self.keyslot(key) for key in args[2 : 2 + int(args[1])]}
            if len(slots) != 1:
                raise RedisClusterException(f"{command} {args[0]}: all keys must map to the same hash slot")
            return slots.pop()
        return await super()._determine_slot(command, *args)


class BlockingSentinelConnectionPool(SentinelConnectionPool, aioredis.BlockingConnectionPool):
    """redis-py's Sentinel pool with the blocking pool's bound: a burst above ``max_connections`` waits
    (up to ``timeout``) for a connection, as in standalone mode. Closing it closes the Sentinel clients."""

    async def disconnect(self, inuse_connections: bool = True) -> None:
        await super().disconnect(inuse_connections)
        if inuse_connections:  # a full close (the client's aclose); a master change passes False
            await self.sentinel_manager.aclose()


@dataclass(frozen=True)
class SentinelTarget:
    """Where a Sentinel-managed primary is found, and the Redis credentials a URL may carry."""

    sentinels: list[tuple[str, int]]
    service: str
    db: int = 0
    username: str | None = None
    password: str | None = None


def is_sentinel_url(url: str | None) -> bool:
    return bool(url) and str(url).lower().startswith(SENTINEL_SCHEME + "://")


def is_cluster_url(url: str | None) -> bool:
    return bool(url) and str(url).lower().startswith(CLUSTER_SCHEME + "://")


@dataclass(frozen=True)
class ClusterTarget:
    """Seed nodes of a Redis Cluster, and the credentials a URL may carry."""

    nodes: list[tuple[str, int]]
    username: str | None = None
    password: str | None = None


def parse_cluster_url(url: str) -> ClusterTarget:
    """``redis+cluster://[user[:password]@]host:port[,host:port...]`` (split by hand, as Sentinel URLs are)."""
    scheme, separator, rest = url.partition("://")
    if not separator or scheme.lower() != CLUSTER_SCHEME:
        raise ValueError(f"invalid {CLUSTER_SCHEME} URL: expected {CLUSTER_SCHEME}://host:port[,host:port]")
    netloc = re.split(r"[/?#]", rest, maxsplit=1)[0]
    userinfo, _, hosts = netloc.rpartition("@")
    try:
        nodes = parse_host_ports(hosts)
    except ValueError as error:
        raise ValueError(f"invalid {CLUSTER_SCHEME} URL: {error}") from None
    if not nodes:
        raise ValueError(f"invalid {CLUSTER_SCHEME} URL: expected {CLUSTER_SCHEME}://host:port[,host:port]")
    username, _, password = userinfo.partition(":")
    return ClusterTarget(nodes, unquote(username) or None, unquote(password) or None)


def cluster_target(settings: Settings, url: str | None = None) -> ClusterTarget | None:
    """The Cluster ``url`` names (``redis+cluster://``), or without a ``url`` the settings' (cluster mode)."""
    if url is not None:
        return parse_cluster_url(url) if is_cluster_url(url) else None
    if is_cluster_url(settings.redis_url):
        return parse_cluster_url(settings.redis_url)
    if settings.redis_mode != "cluster":
        return None
    seed = urlsplit(settings.redis_url)
    username, password = (unquote(part) if part else None for part in (seed.username, seed.password))
    return ClusterTarget([(seed.hostname or "127.0.0.1", seed.port or 6379)], username, password)


def key_space(settings: Settings, url: str | None = None) -> KeySpace:
    """The key layout for the settings' topology (or ``url``'s): on a Cluster every key of a tenant carries
    the tenant's hash tag (engram.redis_keys)."""
    return KeySpace(settings.namespace, tenant_slot=cluster_target(settings, url) is not None)


def parse_sentinel_url(url: str) -> SentinelTarget:
    """``redis+sentinel://[user[:password]@]host:port[,host:port...]/<service>[/<db>]``.

    Split by hand, not with ``urlsplit``: a netloc of several hosts is no URL netloc, and Python versions
    disagree about it (3.11.4+ refuses ``a:1,[::1]:2`` as an invalid IPv6 URL, earlier ones took it)."""
    expected = f"{SENTINEL_SCHEME}://host:port[,host:port]/<service>[/<db>]"
    scheme, separator, rest = url.partition("://")
    if not separator or scheme.lower() != SENTINEL_SCHEME:
        raise ValueError(f"invalid {SENTINEL_SCHEME} URL: expected {expected}")
    netloc, _, path_part = rest.partition("/")
    userinfo, _, hosts = netloc.rpartition("@")
    try:
        sentinels = parse_host_ports(hosts)
    except ValueError as error:
        raise ValueError(f"invalid {SENTINEL_SCHEME} URL: {error}") from None
    path = [segment for segment in re.split(r"[?#]", path_part, maxsplit=1)[0].split("/") if segment]
    if not sentinels or not path or len(path) > 2 or (len(path) == 2 and not path[1].isdigit()):
        raise ValueError(f"invalid {SENTINEL_SCHEME} URL: expected {expected}")
    username, _, password = userinfo.partition(":")
    return SentinelTarget(
        sentinels=sentinels,
        service=unquote(path[0]),
        db=int(path[1]) if len(path) == 2 else 0,
        username=unquote(username) or None,
        password=unquote(password) or None,
    )


def sentinel_target(settings: Settings) -> SentinelTarget | None:
    """The Sentinel topology the settings name, or None in standalone mode."""
    if settings.redis_mode != "sentinel":
        return None
    if is_sentinel_url(settings.redis_url):
        return parse_sentinel_url(settings.redis_url)
    # ENGRAM_REDIS_URL then only gives the database and credentials (as in standalone mode); its host is not used.
    url = urlsplit(settings.redis_url)
    db = int(url.path.strip("/") or 0) if url.path.strip("/").isdigit() else 0
    username, password = (unquote(part) if part else None for part in (url.username, url.password))
    return SentinelTarget(settings.sentinel_addresses, settings.redis_sentinel_service, db, username, password)


def _options(settings: Settings) -> dict[str, Any]:
    """Timeouts, health checks and retry every Engram connection has, in every topology."""
    return {
        "decode_responses": True,
        "socket_timeout": settings.redis_socket_timeout,
        "socket_connect_timeout": settings.redis_connect_timeout,
        "health_check_interval": 30,
        # One quick retry covers a dropped idle connection. Timeouts are not retried: a hung Redis
        # must turn into a 503 after one socket timeout, not two.
        "retry": Retry(ExponentialBackoff(cap=0.1, base=0.01), retries=1, supported_errors=(RedisConnectionError,)),
        "client_name": "engram",
    }


def _credentials(username: str | None, password: str | None) -> dict[str, Any]:
    return {key: value for key, value in (("username", username), ("password", password)) if value}


def create_redis(settings: Settings, url: str | None = None) -> Any:
    """An asyncio Redis client (one connection pool) for ``url``, else for the settings' topology.

    A ``redis+sentinel://`` URL, or ``ENGRAM_REDIS_MODE=sentinel`` without a ``url``, gives a client of
    the Sentinels' current primary; a ``redis+cluster://`` URL, or ``ENGRAM_REDIS_MODE=cluster`` without a
    ``url``, a Cluster client (:class:`EngramRedisCluster`); any other URL is one fixed node (e.g. a replica,
    for ACL users)."""
    password = settings.redis_password.get_secret_value() if settings.redis_password else None
    cluster = cluster_target(settings, url)
    if cluster is not None:
        return _cluster_client(
            settings,
            cluster,
            {**_credentials(cluster.username, cluster.password), **_credentials(settings.redis_username, password)},
        )
    if url is not None:
        target = parse_sentinel_url(url) if is_sentinel_url(url) else None
    else:
        target = sentinel_target(settings)
    if target is not None:
        # Explicit credentials override the URL's, as in standalone mode.
        credentials = {
            **_credentials(target.username, target.password),
            **_credentials(settings.redis_username, password),
        }
        return _sentinel_client(settings, target, credentials)
    # Explicit credentials override the URL's; from_url only takes them as keyword arguments.
    # A blocking pool: a burst above max_connections waits (up to redis_pool_timeout) for a connection
    # to come back instead of failing at once with MaxConnectionsError.
    pool = aioredis.BlockingConnectionPool.from_url(
        url or settings.redis_url,
        max_connections=settings.redis_max_connections,
        timeout=settings.redis_pool_timeout,
        **_options(settings),
        **_credentials(settings.redis_username, password),
    )
    return aioredis.Redis.from_pool(pool)


def _cluster_client(settings: Settings, target: ClusterTarget, credentials: dict[str, Any]) -> EngramRedisCluster:
    options = _options(settings)
    client = EngramRedisCluster(
        startup_nodes=[ClusterNode(host, port) for host, port in target.nodes],
        decode_responses=True,
        socket_timeout=options["socket_timeout"],
        socket_connect_timeout=options["socket_connect_timeout"],
        health_check_interval=options["health_check_interval"],
        client_name=options["client_name"],
        # per node; a burst above it fails at once with 503 (redis-py's cluster nodes have no blocking pool)
        max_connections=settings.redis_max_connections,
        # Redirects and topology refreshes are redis-py's; errors (a primary down until its replica is
        # promoted) are retried briefly, then they are a 503 with Retry-After, never a hang.
        retry=Retry(ExponentialBackoff(cap=0.5, base=0.05), retries=3),
        # A MOVED reply patches the slot map with the slot's new node (exact). redis-py's default also
        # reloads the whole map every 5th MOVED by closing every connection of the client, including those
        # other requests are using at that moment: while a reshard moves live slots that failed turns.
        reinitialize_steps=0,
        **credentials,
    )
    client.engram_made_from = (settings, target, credentials)
    return client


def clone_cluster_client(client: EngramRedisCluster) -> EngramRedisCluster:
    """A new Cluster client made as ``client`` was (fresh connections, e.g. for another event loop)."""
    return _cluster_client(*client.engram_made_from)


def _sentinel_client(settings: Settings, target: SentinelTarget, credentials: dict[str, Any]) -> aioredis.Redis:
    options = _options(settings)
    sentinel_password = settings.redis_sentinel_password
    sentinel_kwargs = {
        "socket_timeout": settings.redis_socket_timeout,
        "socket_connect_timeout": settings.redis_connect_timeout,
        "retry": options["retry"],
        **_credentials(
            settings.redis_sentinel_username, sentinel_password.get_secret_value() if sentinel_password else None
        ),
    }
    sentinel = Sentinel(target.sentinels, sentinel_kwargs=sentinel_kwargs)  # type: ignore[no-untyped-call]
    client: aioredis.Redis = sentinel.master_for(
        target.service,
        connection_pool_class=BlockingSentinelConnectionPool,
        max_connections=settings.redis_max_connections,
        timeout=settings.redis_pool_timeout,
        db=target.db,
        **options,
        **credentials,
    )
    return client


def sentinel_pool(client: RedisClient) -> SentinelConnectionPool | None:
    pool = getattr(client, "connection_pool", None)  # (a Cluster client has one per node)
    return pool if isinstance(pool, SentinelConnectionPool) else None


def sentinel_url_of(client: RedisClient) -> str | None:
    """The ``redis+sentinel://`` URL (without password) a Sentinel client was made from, else None."""
    pool = sentinel_pool(client)
    if pool is None:
        return None
    hosts = ",".join(
        f"{kwargs['host']}:{kwargs['port']}"
        for kwargs in (s.connection_pool.connection_kwargs for s in pool.sentinel_manager.sentinels)
    )
    kwargs = pool.connection_kwargs
    user = f"{kwargs['username']}@" if kwargs.get("username") else ""
    return f"{SENTINEL_SCHEME}://{user}{hosts}/{pool.service_name}/{kwargs.get('db', 0)}"


async def sentinel_nodes(client: RedisClient) -> tuple[tuple[str, int], list[tuple[str, int]]] | None:
    """The primary and the replicas (those not down) the Sentinels know now, for a Sentinel client."""
    pool = sentinel_pool(client)
    if pool is None:
        return None
    manager = pool.sentinel_manager
    primary = await manager.discover_master(pool.service_name)
    replicas = await manager.discover_slaves(pool.service_name)
    return (str(primary[0]), int(primary[1])), [(str(host), int(port)) for host, port in replicas]


def redis_description(settings: Settings) -> str:
    """Where the settings point, for logs: never credentials."""
    durability = f", commits {settings.commit_durability}"
    cluster = cluster_target(settings)
    if cluster is not None:
        return "cluster via " + ",".join(f"{host}:{port}" for host, port in cluster.nodes) + durability
    if settings.redis_mode == "sentinel":
        sentinels = ",".join(f"{host}:{port}" for host, port in settings.sentinel_addresses)
        return f"sentinel {settings.redis_sentinel_service!r} via {sentinels}{durability}"
    return settings.redis_url.split("@")[-1] + durability


def primary_address(client: RedisClient, key: str | None = None) -> str:
    """``host:port`` of the node a client's writes go to now (for a Sentinel client the primary it last
    asked the Sentinels for, which its connections follow; for a Cluster client the primary of ``key``'s
    slot): never credentials."""
    if isinstance(client, RedisCluster):
        node = client.get_node_from_key(key) if key is not None else None
        return str(node.name) if node is not None else "unknown"
    pool = sentinel_pool(client)
    if pool is not None:
        address = pool.master_address
        return f"{address[0]}:{address[1]}" if address else "unknown"
    kwargs = client.connection_pool.connection_kwargs
    return str(kwargs["path"]) if kwargs.get("path") else f"{kwargs.get('host', '?')}:{kwargs.get('port', '?')}"


def cluster_url_of(client: RedisCluster) -> str:
    """The ``redis+cluster://`` URL (without password) of a Cluster client's nodes."""
    nodes = client.get_nodes() or list(client.nodes_manager.startup_nodes.values())
    hosts = ",".join(f"[{n.host}]:{n.port}" if ":" in n.host else f"{n.host}:{n.port}" for n in nodes)
    username = client.connection_kwargs.get("username")
    return f"{CLUSTER_SCHEME}://{username + '@' if username else ''}{hosts}"


async def cluster_nodes(client: RedisClient) -> list[tuple[str, int]] | None:
    """Every reachable node of a Cluster client's cluster now, else None: primaries and replicas as
    ``CLUSTER NODES`` lists them (not redis-py's slot map: ``CLUSTER SLOTS`` leaves out a replica that has
    not synced yet), without nodes flagged failed or without an address."""
    if not isinstance(client, RedisCluster):
        return None
    await client.nodes_manager.initialize()  # nodes added or promoted since the client started count too
    listing = await client.execute_command("CLUSTER NODES", target_nodes=RedisCluster.RANDOM)  # (parsed)
    nodes = []
    for address, node in dict(listing).items():
        if any(flag in str(node.get("flags", "")) for flag in ("fail", "noaddr", "handshake")):
            continue
        host, _, port = str(address).split("@")[0].rpartition(":")
        if host and port.isdigit() and int(port) > 0:
            nodes.append((host.strip("[]"), int(port)))
    return nodes
