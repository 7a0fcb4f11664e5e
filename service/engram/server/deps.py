"""Dependencies of the routes, as ``Annotated`` aliases so route signatures read as plain types.

All are ``async def`` although none awaits: FastAPI runs a plain ``def`` dependency in a worker thread,
and those thread hops were a tenth of a turn's time on the event loop (py-spy, docs/benchmarks.md)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated

import redis.asyncio as aioredis
from fastapi import Depends, Header, Request

from engram.errors import RateLimited
from engram.history.store import HistoryStore
from engram.policy import Tenant
from engram.server import metrics
from engram.server.auth import Authenticator
from engram.server.model import ChatModel
from engram.server.summaries import BackgroundSummaries, SummaryMemory
from engram.server.turn import NullMemory, SessionMemory, TurnContext, TurnMemory
from engram.settings import Settings


@dataclass(frozen=True, slots=True)
class Resources:
    """What the lifespan opens once per process and closes at shutdown."""

    settings: Settings
    redis: aioredis.Redis
    store: HistoryStore
    model: ChatModel
    auth: Authenticator
    served_by: str
    summaries: BackgroundSummaries | None = None  # unless ENGRAM_MEMORY=off


async def get_resources(request: Request) -> Resources:
    resources: Resources = request.app.state.resources
    return resources


ResourcesDep = Annotated[Resources, Depends(get_resources)]


async def get_settings(resources: ResourcesDep) -> Settings:
    return resources.settings


async def get_store(resources: ResourcesDep) -> HistoryStore:
    return resources.store


async def get_tenant(
    resources: ResourcesDep,
    authorization: Annotated[str | None, Header(description="Bearer <api key>")] = None,
) -> Tenant:
    return await resources.auth.tenant(authorization)


SettingsDep = Annotated[Settings, Depends(get_settings)]
StoreDep = Annotated[HistoryStore, Depends(get_store)]
TenantDep = Annotated[Tenant, Depends(get_tenant)]


async def get_metered_tenant(resources: ResourcesDep, tenant: TenantDep) -> Tenant:
    """The tenant, with this request counted against its request rate (429 when over it). Turns use
    :data:`TenantDep`: their load counts them in the same Redis round trip."""
    try:
        await resources.store.check_rate(tenant.name, tenant.policy)
    except RateLimited:
        metrics.observe_quota_rejection("rate_limited")
        raise
    return tenant


MeteredTenantDep = Annotated[Tenant, Depends(get_metered_tenant)]


async def get_turn_context(resources: ResourcesDep, tenant: TenantDep) -> TurnContext:
    memory: TurnMemory = NullMemory()
    if resources.settings.memory != "off":
        mode = tenant.policy.memory or ("summary" if resources.settings.memory == "summary" else "window")
        memory = SessionMemory(resources.store, tenant)
        if mode == "summary" and resources.summaries is not None:
            memory = SummaryMemory(resources.store, tenant, resources.summaries)
    return TurnContext(
        store=resources.store, memory=memory, model=resources.model, tenant=tenant, served_by=resources.served_by
    )


TurnContextDep = Annotated[TurnContext, Depends(get_turn_context)]
