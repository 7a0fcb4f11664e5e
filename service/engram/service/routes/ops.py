"""Liveness, readiness and metrics: no authentication (they say nothing about any tenant)."""

from __future__ import annotations

import logging

from fastapi import APIRouter, Response
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool

from engram.errors import StoreFull, StoreReadOnly, StoreUnavailable
from engram.service import metrics
from engram.service.deps import ResourcesDep
from engram.service.schemas import Health

log = logging.getLogger("engram.service")
router = APIRouter(tags=["operations"])


@router.get("/healthz", response_model=Health)
async def healthz(resources: ResourcesDep) -> Health:
    """Liveness: the process answers (Redis is not consulted)."""
    return Health(status="ok", served_by=resources.served_by)


@router.get("/readyz", response_model=Health, responses={503: {"model": Health}})
async def readyz(resources: ResourcesDep) -> Response:
    """Readiness: Redis would take a turn's commit now (it answers in time, is a primary, is under
    maxmemory). The body says which of these failed, never where Redis is (this endpoint is public)."""
    try:
        with metrics.redis_operation("ready"):
            await resources.store.check_writable()
    except (StoreUnavailable, StoreFull) as error:
        log.warning("not ready: %s", error)
        detail = "Redis is full (maxmemory)" if isinstance(error, StoreFull) else _unready_detail(error)
        body = Health(status="unavailable", served_by=resources.served_by, detail=detail)
        return JSONResponse(body.model_dump(), status_code=503)
    return JSONResponse(Health(status="ok", served_by=resources.served_by).model_dump())


@router.get("/metrics", response_class=Response, responses={200: {"content": {"text/plain": {}}}})
async def metrics_endpoint() -> Response:
    """Prometheus exposition of this replica (all its workers summed)."""
    body, content_type = await run_in_threadpool(metrics.render)
    return Response(body, media_type=content_type)


def _unready_detail(error: StoreUnavailable) -> str:
    return "Redis is read-only (a replica)" if isinstance(error, StoreReadOnly) else "Redis does not answer"
