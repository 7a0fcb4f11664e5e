"""``POST /v1/chat``: one turn, as JSON or as a server-sent event stream."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter

from engram.errors import EngramError
from engram.server.deps import TurnContextDep
from engram.server.errors import error_content
from engram.server.schemas import ERROR_RESPONSES, ChatReply, ChatRequest, ErrorBody
from engram.server.streaming import TurnStreamingResponse, sse
from engram.server.turn import Turn, TurnRequest, start_turn

router = APIRouter(tags=["chat"])

CHAT_RESPONSES: dict[int | str, dict[str, Any]] = {
    **ERROR_RESPONSES,
    200: {
        "description": "the reply (JSON), or with `stream: true` a text/event-stream of `token` events "
        '(`{"text"}`) then one `done` event with the JSON reply fields (or one `error` event)',
        "content": {"text/event-stream": {}},
    },
    409: {"model": ErrorBody, "description": "`turn_id` already used for a different message, or another `subject`"},
    502: {"model": ErrorBody, "description": "the model failed; nothing was stored"},
}


async def _event_stream(turn: Turn) -> AsyncIterator[bytes]:
    """``token`` events (``{"text"}``), then ``done`` (the JSON reply's fields) or ``error`` (the error body)."""
    try:
        async for piece in turn.deltas():
            yield sse({"text": piece}, "token")
    except EngramError as error:
        yield sse(error_content(error)[1], "error")
        return
    assert turn.result is not None
    yield sse(ChatReply.of(turn.result).model_dump(), "done")


@router.post("/v1/chat", response_model=ChatReply, responses=CHAT_RESPONSES)
async def post_chat(body: ChatRequest, ctx: TurnContextDep) -> Any:
    """Send a message; the reply is generated with the session's history loaded from Redis.

    Retrying with the same `turn_id` returns the first result and stores nothing twice. Every answer
    carries `X-Served-By` (host:pid), set for all routes by the app's outer layer."""
    turn = await start_turn(ctx, TurnRequest(body.session_id, body.message, body.turn_id, subject=body.subject))
    if body.stream:
        return TurnStreamingResponse(turn, _event_stream(turn))
    return ChatReply.of(await turn.collect())
