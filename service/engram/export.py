"""A session's export, one JSON object per line (JSON Lines), as both the HTTP export
(``GET /v1/sessions/{id}/export``) and ``engram tenant export`` write it.

Lines: ``{"type": "message", "session_id", "message": {id, role, content, turn_id, created_at}, "archived",
"tokens", "extra"?}`` oldest first (archived messages before the rest); then, where they exist,
``{"type": "summary", "session_id", "text", "covers_through", "messages_covered"}`` (the rolling summary) and
one ``{"type": "memory_block", "session_id", "block", "facts"?, "state"?}`` per durable LlamaIndex memory
block; then ``{"type": "end", "session_id", "messages": N}``. A stream without its ``end`` line was cut
short; the HTTP export then ends with ``{"type": "error", "session_id", "error": {code, message}}`` when it
can. Messages are read page by page, so an export of any length takes constant memory.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Any

from engram.history.store import ExportedMessage, HistoryStore, redis_errors

MESSAGE_LINE = b'{"type":"message"'  # how every message line starts (for counting them)


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


async def session_lines(store: HistoryStore, tenant: str, session_id: str) -> AsyncIterator[bytes]:
    """Every line of one session's export, ``end`` line included."""
    messages = 0
    async for item in store.export(tenant, session_id):
        yield message_line(session_id, item)
        messages += 1
    found = await store.read_summary(tenant, session_id)
    if found is not None and found[1].text:
        summary = found[1]
        yield _line(
            {
                "type": "summary",
                "session_id": session_id,
                "text": summary.text,
                "covers_through": summary.covers_through,
                "messages_covered": summary.messages_covered,
            }
        )
    for block in await _memory_blocks(store, tenant, session_id):
        yield _line({"type": "memory_block", "session_id": session_id, **block})
    yield end_line(session_id, messages)


async def _memory_blocks(store: HistoryStore, tenant: str, session_id: str) -> list[dict[str, Any]]:
    """The durable memory blocks' state of the session (engram.history.blocks): facts by block, then the
    other blocks' state. Bounded by the blocks' own bounds (max facts), so read whole."""
    keys = store.keys.memory_blocks(tenant, session_id)
    async with redis_errors():
        async with store.client.pipeline(transaction=False) as pipe:
            pipe.zrange(keys.facts, 0, -1)
            pipe.hgetall(keys.blocks)
            members, states = await pipe.execute()
    facts: dict[str, list[str]] = {}
    for member in members:
        block, _, fact = _text(member).partition(":")
        facts.setdefault(block, []).append(fact)
    blocks: list[dict[str, Any]] = [{"block": block, "facts": found} for block, found in facts.items()]
    blocks += [{"block": _text(block), "state": _text(state)} for block, state in (states or {}).items()]
    return blocks


def _text(value: Any) -> str:
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def end_line(session_id: str, messages: int) -> bytes:
    return _line({"type": "end", "session_id": session_id, "messages": messages})


def error_line(session_id: str, error: dict[str, Any]) -> bytes:
    return _line({"type": "error", "session_id": session_id, "error": error})


def _line(record: dict[str, Any]) -> bytes:
    return json.dumps(record, ensure_ascii=False, separators=(",", ":")).encode("utf-8") + b"\n"
