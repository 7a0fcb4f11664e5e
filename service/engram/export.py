"""A session's export, one JSON object per line (JSON Lines), as both the HTTP export
(``GET /v1/sessions/{id}/export``) and ``engram tenant export`` write it.

Lines: ``{"type": "message", "session_id", "message": {id, role, content, turn_id, created_at}, "archived",
"tokens", "extra"?}`` oldest first (archived messages before the rest), then ``{"type": "end", "session_id",
"messages": N}``. A stream without its ``end`` line was cut short; the HTTP export then ends with
``{"type": "error", "session_id", "error": {code, message}}`` when it can.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any

from engram.history.store import ExportedMessage


def iso_time(seconds: float) -> str:
    """RFC 3339 UTC time with milliseconds, e.g. ``2025-05-01T12:00:00.123Z``."""
    return datetime.fromtimestamp(seconds, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def message_line(session_id: str, item: ExportedMessage) -> bytes:
    m = item.message
    message = {
        "id": m.id,
        "role": m.role,
        "content": m.content,
        "turn_id": m.turn_id,
        "created_at": iso_time(m.created_at),
    }
    record: dict[str, Any] = {"type": "message", "session_id": session_id, "message": message}
    record.update(archived=item.archived, tokens=m.tokens)
    if m.extra is not None:
        record["extra"] = m.extra
    return _line(record)


def end_line(session_id: str, messages: int) -> bytes:
    return _line({"type": "end", "session_id": session_id, "messages": messages})


def error_line(session_id: str, error: dict[str, Any]) -> bytes:
    return _line({"type": "error", "session_id": session_id, "error": error})


def _line(record: dict[str, Any]) -> bytes:
    return json.dumps(record, ensure_ascii=False, separators=(",", ":")).encode("utf-8") + b"\n"
