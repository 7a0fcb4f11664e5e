"""Liveness, readiness and metrics: no authentication (they say nothing about any tenant)."""

from __future__ import annotations

from fastapi import APIRouter, Response
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool

from engram.errors import StoreUnavailable
from engram.service import metrics
from engram.service.deps import ResourcesDep
from engram.service.schemas import Health

router = APIRouter(tags=["operations"])


@router.get("/healthz", response_model=Health)
async def healthz(resources: ResourcesDep) -> Health:
    """Liveness: the process answers (Redis is not consulted)."""
    return Health(status="ok", served_by=resources.served_by)


@router.get("/readyz", response_model=Health, responses={503: {"model": Health}})
async def readyz(resources: ResourcesDep) -> Response:
    """Readiness: Redis answers a PING within the configured timeout."""
    try:
        with metrics.redis_operation("ready"):
            await resources.store.ping()
    except StoreUnavailable as error:
        body = Health(status="unavailable", served_by=resources.served_by, detail=str(error))
        return JSONResponse(body.model_dump(), status_code=503)
    return JSONResponse(Health(status="ok", served_by=resources.served_by).model_dump())


@router.get("/metrics", response_class=Response, responses={200: {"content": {"text/plain": {}}}})
async def metrics_endpoint() -> Response:
    """Prometheus exposition of this replica (all its workers summed)."""
    body, content_type = await run_in_threadpool(metrics.render)
    return Response(body, media_type=content_type)
