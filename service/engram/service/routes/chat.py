"""``POST /v1/chat``: one turn, as JSON or as a server-sent event stream."""

from __future__ import annotations

import contextlib
import json
from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter
from fastapi.responses import StreamingResponse
from starlette.types import Send

from engram.service.chat import StreamingTurn, chat_turn, open_stream
from engram.service.deps import TurnContextDep
from engram.service.schemas import ERROR_RESPONSES, ChatReply, ChatRequest, ErrorBody

router = APIRouter(tags=["chat"])

CHAT_RESPONSES: dict[int | str, dict[str, Any]] = {
    **ERROR_RESPONSES,
    200: {
        "description": "the reply (JSON), or with `stream: true` a text/event-stream of `token` events "
        '(`{"text"}`) then one `done` event with the JSON reply fields (or one `error` event)',
        "content": {"text/event-stream": {}},
    },
    409: {"model": ErrorBody, "description": "`turn_id` already used for a different message"},
    502: {"model": ErrorBody, "description": "the model failed; nothing was stored"},
}


def sse(event: str, data: dict[str, Any]) -> bytes:
    return f"event: {event}\ndata: {json.dumps(data, ensure_ascii=False)}\n\n".encode()


async def _event_stream(turn: StreamingTurn) -> AsyncIterator[bytes]:
    async with contextlib.aclosing(turn.events()) as events:  # closed with us: the turn sees the client leave
        async for event, data in events:
            yield sse(event, data)


class ClosingStreamingResponse(StreamingResponse):
    """A StreamingResponse that closes its body iterator when it stops, for whatever reason. Starlette
    stops iterating when a send fails (the client left) but leaves the generator suspended until garbage
    collection, and with it the model's stream, which would run (and be billed) to the end."""

    async def stream_response(self, send: Send) -> None:
        try:
            await super().stream_response(send)
        finally:
            close = getattr(self.body_iterator, "aclose", None)
            if close is not None:
                await close()


@router.post("/v1/chat", response_model=ChatReply, responses=CHAT_RESPONSES)
async def post_chat(body: ChatRequest, ctx: TurnContextDep) -> Any:
    """Send a message; the reply is generated with the session's history loaded from Redis.

    Retrying with the same `turn_id` returns the first result and stores nothing twice. Every answer
    carries `X-Served-By` (host:pid), set for all routes by the app's outer layer."""
    if body.stream:
        turn = await open_stream(ctx, body)
        return ClosingStreamingResponse(
            _event_stream(turn),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )
    result = await chat_turn(ctx, body)
    return result.body()
