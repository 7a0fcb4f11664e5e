"""The tenant's sessions, their messages and their export; erasure by subject."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Annotated

from fastapi import APIRouter, Path, Query, Response
from fastapi.responses import StreamingResponse

from engram.errors import EngramError, NotFound
from engram.export import error_line, session_lines
from engram.history.store import HistoryStore
from engram.redis_keys import validate_session_id, validate_subject_id
from engram.server import metrics
from engram.server.deps import MeteredTenantDep, StoreDep
from engram.server.errors import error_content
from engram.server.schemas import (
    ERROR_RESPONSES,
    ErrorBody,
    ExportLine,
    MessageList,
    MessageOut,
    SessionList,
    SessionOut,
    SubjectErased,
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
async def list_sessions(
    store: StoreDep, tenant: MeteredTenantDep, limit: Limit = 100, cursor: Cursor = None
) -> SessionList:
    """The tenant's sessions, in session id order."""
    with metrics.redis_operation("sessions"):
        page = await store.list_sessions(tenant.name, limit=limit, cursor=cursor)
    return SessionList(sessions=[SessionOut.of(s) for s in page.sessions], next=page.next_cursor)


@router.get("/{session_id}/messages", response_model=MessageList)
async def list_messages(
    session_id: SessionId, store: StoreDep, tenant: MeteredTenantDep, limit: Limit = 100, cursor: Cursor = None
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
async def get_summary(session_id: SessionId, store: StoreDep, tenant: MeteredTenantDep) -> SummaryOut:
    """The session's rolling summary (ENGRAM_MEMORY=summary): what fell out of the window, folded."""
    with metrics.redis_operation("summary"):
        summary = await session_summary(store, tenant.name, validate_session_id(session_id))
    if summary is None:
        raise NotFound(f"no session {session_id!r}")
    return SummaryOut.of(summary)


@router.delete(
    "/{session_id}", status_code=204, responses={404: {"model": ErrorBody, "description": "no such session"}}
)
async def delete_session(session_id: SessionId, store: StoreDep, tenant: MeteredTenantDep) -> Response:
    """Delete the session and all its messages."""
    with metrics.redis_operation("delete"):
        deleted = await store.delete_session(tenant.name, validate_session_id(session_id))
    if not deleted:
        raise NotFound(f"no session {session_id!r}")
    return Response(status_code=204)


JSON_LINES = "application/x-ndjson"


async def export_lines(store: HistoryStore, tenant: str, session_id: str) -> AsyncIterator[bytes]:
    """The session as JSON Lines (:mod:`engram.export`). A failure after the first line ends the stream with
    an ``error`` line (the status is already sent)."""
    try:
        async for line in session_lines(store, tenant, session_id):
            yield line
    except EngramError as error:
        yield error_line(session_id, error_content(error)[1]["error"])


@router.get(
    "/{session_id}/export",
    response_class=StreamingResponse,
    responses={
        200: {
            "description": "JSON Lines: `message` lines oldest first (archived ones first), then an `end` line",
            "content": {JSON_LINES: {"schema": ExportLine.model_json_schema()}},
        },
        404: {"model": ErrorBody, "description": "no such session"},
    },
)
async def export_session(session_id: SessionId, store: StoreDep, tenant: MeteredTenantDep) -> StreamingResponse:
    """Every message of the session, archived ones first, as JSON Lines ending with an `end` line."""
    session_id = validate_session_id(session_id)
    with metrics.redis_operation("export"):
        if not await store.exists(tenant.name, session_id):
            raise NotFound(f"no session {session_id!r}")
    return StreamingResponse(export_lines(store, tenant.name, session_id), media_type=JSON_LINES)


subjects = APIRouter(prefix="/v1/subjects", tags=["sessions"], responses=ERROR_RESPONSES)

SubjectId = Annotated[
    str,
    Path(
        description="the end user's id given as `subject` in /v1/chat (`user` in chat completions)",
        json_schema_extra={"pattern": r"^[A-Za-z0-9][A-Za-z0-9._@+:-]{0,127}$"},
    ),
]


@subjects.delete("/{subject_id}", response_model=SubjectErased)
async def erase_subject(subject_id: SubjectId, store: StoreDep, tenant: MeteredTenantDep) -> SubjectErased:
    """Erase every session of an end user: messages, archive, summaries, metadata, index and usage entries.
    Idempotent: erasing a subject with no sessions answers 0."""
    with metrics.redis_operation("erase"):
        deleted = await store.erase_subject(tenant.name, validate_subject_id(subject_id))
    return SubjectErased(subject=subject_id, sessions_deleted=deleted)
