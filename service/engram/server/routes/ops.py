"""Liveness, readiness and metrics: no authentication (they say nothing about any tenant)."""

from __future__ import annotations

import logging

from fastapi import APIRouter, Response
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool

from engram.errors import StoreFull, StoreReadOnly, StoreUnavailable
from engram.server import metrics
from engram.server.deps import Resources, ResourcesDep
from engram.server.schemas import Health

log = logging.getLogger("engram.server")
router = APIRouter(tags=["operations"])


@router.get("/healthz", response_model=Health)
async def healthz(resources: ResourcesDep) -> Health:
    """Liveness: the process answers (Redis is not consulted)."""
    return Health(status="ok", served_by=resources.served_by)


@router.get("/readyz", response_model=Health, responses={503: {"model": Health}})
async def readyz(resources: ResourcesDep) -> Response:
    """Readiness: 503 when Redis does not answer. When it answers but refuses writes (full, read-only)
    the replica stays ready (200, ``degraded``): every replica shares that Redis, so taking them all out
    of the Service would also stop the reads and deletes that still work (and free space). The body says
    what is wrong, never where Redis is (this endpoint is public)."""
    try:
        with metrics.redis_operation("ready"):
            await resources.store.check_writable()
    except StoreFull as error:
        return _degraded(resources, "Redis is full (maxmemory)", error)
    except StoreReadOnly as error:
        return _degraded(resources, "Redis refuses writes (read-only replica or too few replicas)", error)
    except StoreUnavailable as error:
        log.warning("not ready: %s", error)
        body = Health(status="unavailable", served_by=resources.served_by, detail="Redis does not answer")
        return JSONResponse(body.model_dump(), status_code=503)
    return JSONResponse(Health(status="ok", served_by=resources.served_by).model_dump())


@router.get("/metrics", response_class=Response, responses={200: {"content": {"text/plain": {}}}})
async def metrics_endpoint() -> Response:
    """Prometheus exposition of this replica (all its workers summed)."""
    body, content_type = await run_in_threadpool(metrics.render)
    return Response(body, media_type=content_type)


def _degraded(resources: Resources, detail: str, error: Exception) -> JSONResponse:
    log.warning("degraded: %s", error)
    return JSONResponse(Health(status="degraded", served_by=resources.served_by, detail=detail).model_dump())
