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
from typing import Any, TypeVar

import redis.asyncio as aioredis

from engram.history.store import HistoryStore

T = TypeVar("T")
Operation = Callable[[HistoryStore], Awaitable[T]]
"""One store operation, written once and run either on the caller's loop or through the sync bridge."""
SYNC_CALL_TIMEOUT_SECONDS = 30.0


def clone_store(store: HistoryStore) -> HistoryStore:
    """A store with the same settings and a fresh connection pool (for use on another loop)."""
    pool = store.client.connection_pool
    extra: dict[str, Any] = {"timeout": pool.timeout} if isinstance(pool, aioredis.BlockingConnectionPool) else {}
    client = aioredis.Redis(
        connection_pool=type(pool)(
            connection_class=pool.connection_class,
            max_connections=pool.max_connections,
            **extra,
            **pool.connection_kwargs,
        )
    )
    return HistoryStore(
        client,
        store.keys,
        cache_sessions=store.cache_capacity,
        tokenizer=store.count_tokens,
        max_message_bytes=store.max_message_bytes,
        max_window_messages=store.max_window_messages,
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
