"""A turn streamed as server-sent events, by either API (``/v1/chat`` and ``/v1/chat/completions``)."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Mapping
from typing import Any

from fastapi.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from engram.server.turn import Turn

SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


def sse(data: dict[str, Any] | str, event: str | None = None) -> bytes:
    """One server-sent event: ``data`` as JSON (a str as it is, e.g. OpenAI's ``[DONE]``), named ``event``."""
    text = data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)
    return (f"event: {event}\n" if event else "").encode() + f"data: {text}\n\n".encode()


class TurnStreamingResponse(StreamingResponse):
    """Streams ``events`` (the turn's pieces, formatted by the route) and always ends the turn when the
    response ends, however it ends. Starlette stops iterating when the client leaves but leaves the body
    suspended until garbage collection, or (ASGI < 2.4) cancels it before it starts; the turn's model
    stream would then run, and be billed, to the end."""

    def __init__(self, turn: Turn, events: AsyncIterator[bytes], headers: Mapping[str, str] | None = None) -> None:
        super().__init__(events, media_type="text/event-stream", headers={**SSE_HEADERS, **(headers or {})})
        self.turn = turn

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self.turn.aclose()
