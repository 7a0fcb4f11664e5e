"""Request and response bodies of the HTTP API (they make the OpenAPI document)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field

from engram.export import iso_time
from engram.messages import SessionInfo, SessionSummary, StoredMessage
from engram.server.turn import TurnResult


class ChatRequest(BaseModel):
    # The constraints are checked by the service (with its own error codes, see docs/service.md); they are
    # only published in the OpenAPI document (json_schema_extra), so clients and schema-driven tests know them.
    session_id: str = Field(
        description="the conversation; 1-128 of [A-Za-z0-9._-], starting alphanumeric",
        json_schema_extra={"pattern": r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$"},
    )
    message: str = Field(
        description="the user's message (at most ENGRAM_MAX_MESSAGE_BYTES of UTF-8), not only whitespace",
        json_schema_extra={"pattern": r"\S"},
    )
    turn_id: str | None = Field(
        default=None,
        description="idempotency key: a retry with the same turn_id returns the first result",
        json_schema_extra={"pattern": r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,127}$"},
    )
    # strict: JSON true/false only (0, 1 or "yes" are refused, as the published schema says)
    stream: bool = Field(default=False, strict=True, description="answer as text/event-stream: token events, then done")
    subject: str | None = Field(
        default=None,
        description="the end user the session belongs to (set once per session), so DELETE /v1/subjects/{subject} "
        "erases all of their sessions; 1-128 of [A-Za-z0-9._@+:-], starting alphanumeric",
        json_schema_extra={"pattern": r"^[A-Za-z0-9][A-Za-z0-9._@+:-]{0,127}$"},
    )


class HistoryInfo(BaseModel):
    cache: Literal["hit", "delta", "miss", "off"] = Field(
        description="how this replica loaded the history (`off`: ENGRAM_MEMORY=off, the benchmark baseline)"
    )
    messages: int = Field(description="earlier messages handed to the model")


class ChatReply(BaseModel):
    session_id: str
    turn_id: str
    reply: str
    served_by: str = Field(description="host:pid of the process that answered")
    redis_node: str | None = Field(
        None, description="host:port of the Redis primary that holds the session and took the commit (null: memory off)"
    )
    history: HistoryInfo

    @classmethod
    def of(cls, result: TurnResult) -> ChatReply:
        history = HistoryInfo(cache=result.cache, messages=result.messages)
        return cls(
            session_id=result.session_id,
            turn_id=result.turn_id,
            reply=result.reply,
            served_by=result.served_by,
            redis_node=result.redis_node,
            history=history,
        )


class SessionOut(BaseModel):
    session_id: str
    messages: int
    updated_at: str

    @classmethod
    def of(cls, info: SessionInfo) -> SessionOut:
        return cls(session_id=info.session_id, messages=info.messages, updated_at=iso_time(info.updated_at))


class SessionList(BaseModel):
    sessions: list[SessionOut]
    next: str | None = Field(description="pass back as ?cursor= for the next page; null on the last")


class MessageOut(BaseModel):
    id: str
    role: str = Field(description="user or assistant (other LlamaIndex roles if a library client wrote them)")
    content: str
    turn_id: str | None
    created_at: str

    @classmethod
    def of(cls, message: StoredMessage) -> MessageOut:
        return cls(
            id=message.id,
            role=message.role,
            content=message.content,
            turn_id=message.turn_id,
            created_at=iso_time(message.created_at),
        )


class ExportLine(BaseModel):
    """One line of a session's JSON Lines export: ``message`` lines oldest first (archived ones before
    the rest), then one ``end`` line with the count (a stream cut short has none), or one ``error`` line."""

    type: Literal["message", "end", "error"]
    session_id: str
    message: MessageOut | None = None
    archived: bool | None = Field(None, description="moved to the archive (LlamaIndex Memory): not in the window")
    extra: str | None = Field(None, description="JSON of LlamaIndex additional_kwargs/blocks, when there are any")
    tokens: int | None = None
    messages: int | None = Field(None, description="on the end line: how many message lines were sent")
    error: dict[str, str] | None = Field(None, description="on an error line: its code and message")


class SubjectErased(BaseModel):
    subject: str
    sessions_deleted: int


class MessageList(BaseModel):
    messages: list[MessageOut]
    next: str | None


class SummaryOut(BaseModel):
    text: str = Field(description="the rolling summary of the messages that fell out of the window ('' if none)")
    covers_through: str | None = Field(description="id of the newest message the summary covers; null if none")
    messages_covered: int = Field(description="how many messages the summary covers")

    @classmethod
    def of(cls, summary: SessionSummary) -> SummaryOut:
        return cls(text=summary.text, covers_through=summary.covers_through, messages_covered=summary.messages_covered)


class ErrorDetail(BaseModel):
    code: str
    message: str
    turn_id: str | None = Field(None, description="with `outcome_unknown`: the turn id to retry with")


class ErrorBody(BaseModel):
    error: ErrorDetail


class Health(BaseModel):
    status: Literal["ok", "degraded", "unavailable"]
    served_by: str
    detail: str | None = None


ERROR_RESPONSES: dict[int | str, dict[str, object]] = {
    401: {"model": ErrorBody, "description": "missing or unknown API key"},
    403: {"model": ErrorBody, "description": "the tenant is at its session or storage quota; nothing was stored"},
    413: {"model": ErrorBody, "description": "message over the size limit"},
    422: {"model": ErrorBody, "description": "invalid session id, cursor or body"},
    429: {"model": ErrorBody, "description": "over the tenant's request rate; retry after `Retry-After` seconds"},
    503: {
        "model": ErrorBody,
        "description": "Redis unavailable or read-only (retry); `outcome_unknown`: retry with `error.turn_id`",
    },
    507: {"model": ErrorBody, "description": "Redis is full (maxmemory); nothing was stored"},
}
