"""The tenant's sessions and their messages."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Path, Query, Response

from engram.errors import NotFound
from engram.redis_keys import validate_session_id
from engram.server import metrics
from engram.server.deps import StoreDep, TenantDep
from engram.server.schemas import (
    ERROR_RESPONSES,
    ErrorBody,
    MessageList,
    MessageOut,
    SessionList,
    SessionOut,
    SummaryOut,
)
from engram.server.summaries import session_summary

router = APIRouter(prefix="/v1/sessions", tags=["sessions"], responses=ERROR_RESPONSES)

Limit = Annotated[int, Query(ge=1, le=1000, description="page size")]
# checked by the store (422 invalid_cursor, also when too long); the limit is only published in the OpenAPI document
Cursor = Annotated[str | None, Query(description="`next` of the previous page", json_schema_extra={"maxLength": 512})]
# checked by validate_session_id (422 invalid_session_id); the pattern is only published in the OpenAPI document
SessionId = Annotated[
    str,
    Path(
        description="1-128 of [A-Za-z0-9._-], starting alphanumeric",
        json_schema_extra={"pattern": r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$"},
    ),
]


@router.get("", response_model=SessionList)
async def list_sessions(store: StoreDep, tenant: TenantDep, limit: Limit = 100, cursor: Cursor = None) -> SessionList:
    """The tenant's sessions, in session id order."""
    with metrics.redis_operation("sessions"):
        page = await store.list_sessions(tenant.name, limit=limit, cursor=cursor)
    return SessionList(sessions=[SessionOut.of(s) for s in page.sessions], next=page.next_cursor)


@router.get("/{session_id}/messages", response_model=MessageList)
async def list_messages(
    session_id: SessionId, store: StoreDep, tenant: TenantDep, limit: Limit = 100, cursor: Cursor = None
) -> MessageList:
    """A session's messages, oldest first (an unknown session has none)."""
    with metrics.redis_operation("messages"):
        page = await store.messages(tenant.name, validate_session_id(session_id), limit=limit, cursor=cursor)
    return MessageList(messages=[MessageOut.of(m) for m in page.messages], next=page.next_cursor)


@router.get(
    "/{session_id}/summary",
    response_model=SummaryOut,
    responses={404: {"model": ErrorBody, "description": "no such session"}},
)
async def get_summary(session_id: SessionId, store: StoreDep, tenant: TenantDep) -> SummaryOut:
    """The session's rolling summary (ENGRAM_MEMORY=summary): what fell out of the window, folded."""
    with metrics.redis_operation("summary"):
        summary = await session_summary(store, tenant.name, validate_session_id(session_id))
    if summary is None:
        raise NotFound(f"no session {session_id!r}")
    return SummaryOut.of(summary)


@router.delete(
    "/{session_id}", status_code=204, responses={404: {"model": ErrorBody, "description": "no such session"}}
)
async def delete_session(session_id: SessionId, store: StoreDep, tenant: TenantDep) -> Response:
    """Delete the session and all its messages."""
    with metrics.redis_operation("delete"):
        deleted = await store.delete_session(tenant.name, validate_session_id(session_id))
    if not deleted:
        raise NotFound(f"no session {session_id!r}")
    return Response(status_code=204)
