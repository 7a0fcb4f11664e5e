"""Running the async store from LlamaIndex's sync methods and from foreign event loops.

A ``redis.asyncio`` connection belongs to the event loop that opened it. LlamaIndex calls memories
and chat stores from sync code (``chat()``), from ``asyncio_run`` helpers that start throwaway loops,
and from the application's own loop. So each loop gets its own store (same Redis, same settings), and
sync calls run on one private background loop thread.
"""

from __future__ import annotations

import asyncio
import threading
import weakref
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, Self, TypeVar

import redis.asyncio as aioredis
from pydantic import BaseModel, Field, PrivateAttr
from redis.asyncio.cluster import RedisCluster
from redis.asyncio.sentinel import Sentinel

from engram.connections import (
    BlockingSentinelConnectionPool,
    EngramRedisCluster,
    clone_cluster_client,
    cluster_url_of,
    create_redis,
    key_space,
    sentinel_url_of,
)
from engram.history.store import HistoryStore
from engram.policy import SESSION_TTL_SECONDS, Policy
from engram.settings import Settings

T = TypeVar("T")
Operation = Callable[[HistoryStore], Awaitable[T]]
"""One store operation, written once and run either on the caller's loop or through the sync bridge."""
SYNC_CALL_TIMEOUT_SECONDS = 30.0


def store_from_url(url: str, namespace: str = "engram", **settings: Any) -> HistoryStore:
    """A :class:`HistoryStore` on ``url`` with Engram's default timeouts.

    ``url`` is one Redis (``redis://``, ``rediss://``, ``unix://``), a Sentinel topology,
    ``redis+sentinel://host:port[,host:port...]/<service>[/<db>]`` (the client follows its failovers), or a
    Redis Cluster, ``redis+cluster://host:port[,host:port...]`` (any seed nodes).
    ``settings`` are :class:`~engram.settings.Settings` fields, e.g. ``commit_durability="replicated"`` (or
    ``redis_mode="sentinel", redis_sentinels="h:26379,..."`` instead of a ``redis+sentinel://`` URL).
    """
    # The URL names the topology: ENGRAM_REDIS_MODE / ENGRAM_REDIS_SENTINELS in the environment do not apply.
    topology = {"redis_mode": "standalone", "redis_sentinels": ""}
    config = Settings(**{"redis_url": url, "namespace": namespace, **topology, **settings})
    # (explicit redis_mode="sentinel" + redis_sentinels=... kwargs: the URL gives only database and credentials)
    target = url if config.redis_mode == "standalone" else None
    return HistoryStore(
        create_redis(config, target),
        key_space(config, target),
        cache_sessions=config.cache_sessions,
        commit_durability=config.commit_durability,
        commit_replica_timeout_ms=config.commit_replica_timeout_ms,
    )


def _clone_client(client: Any) -> Any:
    """A client on the same Redis (or the same Sentinels, or Cluster) with the same settings and fresh pools."""
    if isinstance(client, EngramRedisCluster):
        return clone_cluster_client(client)
    pool = client.connection_pool
    if isinstance(pool, BlockingSentinelConnectionPool):
        manager = pool.sentinel_manager
        addresses = [
            (s.connection_pool.connection_kwargs["host"], s.connection_pool.connection_kwargs["port"])
            for s in manager.sentinels
        ]
        kwargs = {k: v for k, v in pool.connection_kwargs.items() if k not in ("connection_pool", "connection_class")}
        sentinel = Sentinel(addresses, sentinel_kwargs=manager.sentinel_kwargs)  # type: ignore[no-untyped-call]
        sentinel_client: aioredis.Redis = sentinel.master_for(
            pool.service_name,
            connection_pool_class=type(pool),
            max_connections=pool.max_connections,
            timeout=pool.timeout,
            **kwargs,
        )
        return sentinel_client
    extra: dict[str, Any] = {"timeout": pool.timeout} if isinstance(pool, aioredis.BlockingConnectionPool) else {}
    return aioredis.Redis(
        connection_pool=type(pool)(
            connection_class=pool.connection_class,
            max_connections=pool.max_connections,
            **extra,
            **pool.connection_kwargs,
        )
    )


def clone_store(store: HistoryStore) -> HistoryStore:
    """A store with the same settings and a fresh connection pool (for use on another loop)."""
    return HistoryStore(
        _clone_client(store.client),
        store.keys,
        cache_sessions=store.cache_capacity,
        tokenizer=store.count_tokens,
        max_message_bytes=store.max_message_bytes,
        max_window_messages=store.max_window_messages,
        commit_durability=store.commit_durability,
        commit_replica_timeout_ms=store.commit_replica_timeout_ms,
    )


class _BackgroundLoop:
    """One daemon thread running an event loop, shared by every sync call in the process."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None

    def loop(self) -> asyncio.AbstractEventLoop:
        with self._lock:
            if self._loop is None or self._loop.is_closed():
                self._loop = asyncio.new_event_loop()
                thread = threading.Thread(target=self._loop.run_forever, name="engram-sync", daemon=True)
                thread.start()
            return self._loop

    def run(self, coroutine: Coroutine[Any, Any, T]) -> T:
        future = asyncio.run_coroutine_threadsafe(coroutine, self.loop())
        return future.result(timeout=SYNC_CALL_TIMEOUT_SECONDS)


_background = _BackgroundLoop()


def background_loop() -> asyncio.AbstractEventLoop:
    """The loop of Engram's background thread (sync calls, and work no caller waits for)."""
    return _background.loop()


class StoreRuntime:
    """Hands out the right :class:`HistoryStore` for the calling loop, and runs sync calls."""

    def __init__(self, store: HistoryStore) -> None:
        self._home = store
        self._home_loop: weakref.ReferenceType[asyncio.AbstractEventLoop] | None = None
        self._per_loop: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, HistoryStore] = weakref.WeakKeyDictionary()
        self._lock = threading.Lock()

    @property
    def home(self) -> HistoryStore:
        return self._home

    def current(self) -> HistoryStore:
        """The store for the running loop: the one given at construction on the first loop that asks."""
        loop = asyncio.get_running_loop()
        with self._lock:
            if self._home_loop is None or self._home_loop() is None:
                self._home_loop = weakref.ref(loop)
            if self._home_loop() is loop:
                return self._home
            store = self._per_loop.get(loop)
            if store is None:
                store = self._per_loop[loop] = clone_store(self._home)
            return store

    async def call(self, operation: Operation[T]) -> T:
        return await operation(self.current())

    def call_sync(self, operation: Operation[T]) -> T:
        async def run() -> T:
            return await operation(self.current())

        return _background.run(run())


def url_of(store: HistoryStore) -> str:
    """A URL that reconnects to ``store``'s Redis, without its password: a serialized adapter must not
    carry a secret it was not given as part of a URL (the reconnect reads ``ENGRAM_REDIS_PASSWORD``).
    A store on Sentinels gives its ``redis+sentinel://`` URL: the copy follows failovers too."""
    client = store.client
    if isinstance(client, RedisCluster):
        return cluster_url_of(client)
    sentinel_url = sentinel_url_of(client)
    if sentinel_url is not None:
        return sentinel_url
    kwargs = client.connection_pool.connection_kwargs
    db = kwargs.get("db", 0)
    if "path" in kwargs:
        return f"unix://{kwargs['path']}?db={db}"
    scheme = "rediss" if "ssl" in client.connection_pool.connection_class.__name__.lower() else "redis"
    user = f"{kwargs['username']}@" if kwargs.get("username") else ""
    return f"{scheme}://{user}{kwargs.get('host', '127.0.0.1')}:{kwargs.get('port', 6379)}/{db}"


class Reconnecting:
    """The store behind an adapter, made from its ``redis_url`` on first use: so an adapter that was
    pickled, or rebuilt by ``from_dict`` / ``model_validate``, works again without a client."""

    redis_url: str
    namespace: str
    _runtime: StoreRuntime | None

    @staticmethod
    def _connection_fields(store: HistoryStore | None, data: dict[str, Any]) -> dict[str, Any]:
        data.pop("class_name", None)  # to_dict() output, passed back to the constructor
        if store is None and not data.get("redis_url"):
            raise TypeError("pass store= (a HistoryStore) or redis_url=")
        if store is not None:
            data.setdefault("redis_url", url_of(store))
            data.setdefault("namespace", store.keys.namespace)
        return data

    @property
    def runtime(self) -> StoreRuntime:
        if self._runtime is None:
            self._runtime = StoreRuntime(store_from_url(self.redis_url, self.namespace))
        return self._runtime

    def _unpicklable(self) -> dict[str, Any]:
        """Private attributes left out of a pickle, with the values an unpickled copy starts from."""
        return {"_runtime": None}

    def __getstate__(self) -> dict[str, Any]:
        # pydantic's state, minus the connection (locks, sockets, an event loop's pool)
        model: Any = self
        return {
            "__dict__": dict(model.__dict__),
            "__pydantic_extra__": model.__pydantic_extra__,
            "__pydantic_fields_set__": model.__pydantic_fields_set__,
            "__pydantic_private__": {**(model.__pydantic_private__ or {}), **self._unpicklable()},
        }

    def __setstate__(self, state: dict[str, Any]) -> None:
        # pydantic's, not BaseComponent's (which re-runs __init__ and so drops private state)
        BaseModel.__setstate__(self, state)  # type: ignore[arg-type]


class StoreFields(Reconnecting, BaseModel):
    """What every adapter on a session's Redis keys shares (the chat stores and the durable memory blocks):
    where the sessions are, whose they are, how long they live."""

    redis_url: str = Field(description="Redis URL the store (re)connects to")
    namespace: str = Field(default="engram", description="Engram key namespace")
    tenant: str = Field(default="default", description="tenant (DNS label) the sessions belong to")
    ttl: int = Field(
        default=0,
        ge=SESSION_TTL_SECONDS.minimum,
        le=SESSION_TTL_SECONDS.maximum,
        description="seconds an idle session lives; 0 = forever",
    )

    _runtime: StoreRuntime | None = PrivateAttr(default=None)

    def __init__(self, *, store: HistoryStore | None = None, **data: Any) -> None:
        super().__init__(**self._connection_fields(store, data))
        if store is not None:
            self._runtime = StoreRuntime(store)

    @classmethod
    def from_url(cls, url: str, **data: Any) -> Self:
        return cls(redis_url=url, **data)


class ChatStoreFields(StoreFields):
    """What the two chat-store adapters share. Each declares its own ``max_messages`` (its default differs)."""

    max_messages: int

    @property
    def policy(self) -> Policy:
        return Policy(session_ttl_seconds=self.ttl, max_messages_per_session=self.max_messages)
