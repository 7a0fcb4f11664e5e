"""The FastAPI application: built by :func:`create_app`, one shared Redis client per process.

Run it with ``engram serve`` (which also sets up multiprocess metrics for ``--workers``), or with any
ASGI server as a factory: ``uvicorn --factory engram.server.app:create_app``.
"""

from __future__ import annotations

import logging
import os
import socket
import sys
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import redis.asyncio as aioredis
from fastapi import FastAPI
from redis.exceptions import RedisError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

import engram
from engram.connections import create_redis, key_space, redis_description
from engram.errors import StoreUnavailable
from engram.history.store import HistoryStore
from engram.server import errors, metrics
from engram.server.auth import Authenticator, KeyResolver
from engram.server.config import check_llm_settings
from engram.server.deps import Resources
from engram.server.model import build_model
from engram.server.routes import chat, openai, ops, sessions, web
from engram.server.summaries import BackgroundSummaries
from engram.settings import Settings, get_settings

log = logging.getLogger("engram.server")

AUTH_DISABLED_WARNING = (
    "\n" + "!" * 78 + "\n"
    "!!  ENGRAM_AUTH=disabled: NO AUTHENTICATION. Every request is tenant 'default'.\n"
    "!!  Anyone who can reach this port can read and delete every conversation.\n"
    "!!  Use it on a laptop only; set ENGRAM_AUTH=required anywhere else.\n" + "!" * 78
)

MEMORY_OFF_WARNING = (
    "ENGRAM_MEMORY=off: a benchmark baseline. Chat turns load and store no history; "
    "the model is given only the new message."
)


def served_by() -> str:
    """``host:pid`` of this process: what X-Served-By and ``served_by`` say."""
    return f"{socket.gethostname()}:{os.getpid()}"


def max_request_bytes(settings: Settings) -> int:
    """Largest request body accepted: a message at the limit, JSON-escaped (\\uXXXX is 6 bytes for 1 to 3
    bytes of UTF-8), plus room for the other fields."""
    return settings.max_message_bytes * 6 + 64 * 1024


# Request line and headers together: a browser or SDK sends a few KiB at most. Larger is refused with 431
# before the app runs (HAProxy and the ingress cap them first; see deploy/local/haproxy.cfg.template).
MAX_HEADER_BYTES = 16 * 1024


def configure_logging() -> None:
    logger = logging.getLogger("engram")
    if not logger.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s [%(process)d] %(message)s"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
        logger.propagate = False


class Observed:
    """Outermost ASGI layer: X-Served-By on every answer, the request body limit, and HTTP metrics
    labelled by route template (never by raw path)."""

    def __init__(self, app: ASGIApp, max_body: int) -> None:
        self.app = app
        self.max_body = max_body
        self.served_by = served_by()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        header_bytes = sum(len(name) + len(value) + 4 for name, value in scope.get("headers", ()))
        if header_bytes > MAX_HEADER_BYTES:
            message = f"request headers over {MAX_HEADER_BYTES} bytes"
            too_large = errors.error_response(431, "headers_too_large", message, path=scope.get("path", ""))
            await too_large(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500
        received = 0

        async def counted_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_body:
                    raise StarletteHTTPException(413, f"request body over {self.max_body} bytes")
            return message

        async def marked_send(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
                message.setdefault("headers", [])
                message["headers"] = [*message["headers"], (b"x-served-by", self.served_by.encode())]
            await send(message)

        try:
            await self.app(scope, counted_receive, marked_send)
        finally:
            route = scope.get("route")
            template = getattr(route, "path", None) or "unmatched"
            metrics.observe_http(template, scope.get("method", "GET"), status, time.perf_counter() - started)


def _tenant_registry(settings: Settings, redis: aioredis.Redis) -> KeyResolver | None:
    """The API-key resolver when auth is required (the tenancy package's registry, read from Redis)."""
    if settings.auth != "required":
        return None
    from engram.tenancy.registry import TenantRegistry

    return TenantRegistry(redis, key_space(settings), settings.tenant_cache_seconds)


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    settings: Settings = app.state.settings
    for secret in (settings.llm_api_key, settings.redis_password):  # masked in any error text we log
        errors.register_secret(secret.get_secret_value() if secret else None)
    redis = create_redis(settings)
    store = HistoryStore(
        redis,
        key_space(settings),
        cache_sessions=settings.cache_sessions,
        max_message_bytes=settings.max_message_bytes,
        commit_durability=settings.commit_durability,
        commit_replica_timeout_ms=settings.commit_replica_timeout_ms,
    )
    auth = Authenticator(settings, _tenant_registry(settings, redis))
    if not auth.required:
        log.warning(AUTH_DISABLED_WARNING)
    try:
        await store.ensure_library()
    except StoreUnavailable as error:
        log.warning("Redis is unreachable at start-up (%s); /readyz fails until it answers", error)
    except RedisError as error:  # e.g. a user not allowed to FUNCTION LOAD: the library must be loaded for it
        log.warning("could not load Engram's Redis functions (%s); expecting them to be loaded already", error)
    model = build_model(settings)
    summaries = None
    if settings.memory != "off":  # summary mode may be the default or a tenant's choice (its policy's memory)
        summaries = BackgroundSummaries(
            store,
            model,
            max_tokens=settings.summary_max_tokens,
            batch=settings.summary_batch,
            concurrency=settings.summary_concurrency,
        )
    app.state.resources = Resources(
        settings=settings,
        redis=redis,
        store=store,
        model=model,
        auth=auth,
        served_by=served_by(),
        summaries=summaries,
    )
    log.info(
        "engram %s serving as %s (redis %s, model %s, auth %s, memory %s)",
        engram.__version__,
        served_by(),
        redis_description(settings),
        settings.llm,
        settings.auth,
        settings.memory,
    )
    if settings.memory == "off":
        log.warning(MEMORY_OFF_WARNING)
    try:
        yield
    finally:
        if summaries is not None:
            await summaries.aclose()
        await app.state.resources.model.aclose()
        await redis.aclose()


def create_app(settings: Settings | None = None) -> FastAPI:
    """Build the application (no I/O here: the lifespan opens the Redis client)."""
    settings = settings or get_settings()
    check_llm_settings(settings)
    configure_logging()
    metrics.initialise()
    app = FastAPI(
        title="Engram",
        version=engram.__version__,
        summary="Chat with LlamaIndex memory that survives scaling: history in Redis, any replica serves any turn.",
        lifespan=lifespan,
        docs_url="/docs" if settings.docs_ui else None,
        redoc_url=None,
    )
    app.state.settings = settings
    errors.install(app)
    app.include_router(chat.router)
    app.include_router(openai.router)
    app.include_router(sessions.router)
    app.include_router(sessions.subjects)
    app.include_router(ops.router)
    app.include_router(web.router)
    app.add_middleware(Observed, max_body=max_request_bytes(settings))
    return app
