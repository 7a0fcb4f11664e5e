"""OpenAI-compatible routes with Engram's memory behind them: ``POST /v1/chat/completions``, ``GET /v1/models``.

The tenant's API key is the OpenAI API key, so ``OpenAI(base_url=".../v1", api_key=<tenant key>)``
works unchanged; the memory rule is in :mod:`engram.server.openai_api`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator
from typing import Annotated, Any

from fastapi import APIRouter, Header
from fastapi.responses import JSONResponse

from engram.errors import EngramError
from engram.server.deps import ResourcesDep, TenantDep, TurnContextDep
from engram.server.errors import ModelNotFound, OpenAIErrorBody, error_content
from engram.server.openai_api import (
    ChatCompletionRequest,
    chunk,
    completion,
    completion_id,
    model_card,
    models_list,
    now,
    session_of,
    turn_request,
    usage_chunk,
)
from engram.server.streaming import TurnStreamingResponse, sse
from engram.server.turn import NullMemory, Turn, redis_node, start_turn

router = APIRouter(tags=["openai"])
STARTED = now()
PATH = "/v1/chat/completions"

OPENAI_ERRORS: dict[int | str, dict[str, Any]] = {
    400: {"model": OpenAIErrorBody, "description": "invalid request (OpenAI's invalid_request_error)"},
    401: {"model": OpenAIErrorBody, "description": "missing or unknown API key"},
    404: {"model": OpenAIErrorBody, "description": "`model_not_found`: see GET /v1/models"},
    413: {"model": OpenAIErrorBody, "description": "request body over the size limit"},
    503: {"model": OpenAIErrorBody, "description": "Redis unavailable (retry); `outcome_unknown`: retry with the key"},
    507: {"model": OpenAIErrorBody, "description": "Redis is full (maxmemory); nothing was stored"},
}
COMPLETION_RESPONSES: dict[int | str, dict[str, Any]] = {
    **OPENAI_ERRORS,
    200: {
        "description": "a `chat.completion`, or with `stream: true` `chat.completion.chunk` events ending with "
        "`data: [DONE]`",
        "content": {"text/event-stream": {}},
    },
    409: {"model": OpenAIErrorBody, "description": "`Idempotency-Key` already used for a different message"},
    502: {"model": OpenAIErrorBody, "description": "the model failed; nothing was stored"},
}


def _check_model(served: str, asked: str) -> None:
    if asked != served:
        raise ModelNotFound(f"the model {asked!r} does not exist here: this service serves {served!r}")


@router.get("/v1/models", responses=OPENAI_ERRORS)
async def list_models(resources: ResourcesDep, _: TenantDep) -> dict[str, Any]:
    """The model this service answers with (OpenAI's model list)."""
    return models_list(resources.model.name, STARTED)


@router.get("/v1/models/{model}", responses=OPENAI_ERRORS)
async def get_model(model: str, resources: ResourcesDep, _: TenantDep) -> dict[str, Any]:
    _check_model(resources.model.name, model)
    return model_card(model, STARTED)


async def _chunks(turn: Turn, model: str, created: int, include_usage: bool) -> AsyncIterator[bytes]:
    """OpenAI's stream: a role chunk, a chunk per piece, a finish chunk, the usage chunk if asked, [DONE].
    An error after the first piece is one ``data: {"error": ...}`` event (the SDKs raise it)."""
    chunk_id = completion_id(turn.turn.turn_id)
    yield sse(chunk(chunk_id, model, created, {"role": "assistant", "content": ""}, None))
    try:
        async for piece in turn.deltas():
            yield sse(chunk(chunk_id, model, created, {"content": piece}, None))
    except EngramError as error:
        yield sse(error_content(error, PATH)[1])
        return
    yield sse(chunk(chunk_id, model, created, {}, "stop"))
    if include_usage and turn.result is not None:
        yield sse(usage_chunk(turn.result, model, created))
    yield sse("[DONE]")


@router.post(PATH, responses=COMPLETION_RESPONSES)
async def chat_completions(
    body: ChatCompletionRequest,
    ctx: TurnContextDep,
    x_engram_session: Annotated[
        str | None,
        Header(
            description="the session whose memory answers (or `metadata.session_id`); without one, stateless",
            json_schema_extra={"pattern": r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$"},
        ),
    ] = None,
    idempotency_key: Annotated[
        str | None,
        Header(
            description="the turn id: a retry with it is answered once and stored once",
            json_schema_extra={"pattern": r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,127}$"},
        ),
    ] = None,
) -> Any:
    """OpenAI's chat completions, with the session's memory put in front of the new user message."""
    _check_model(ctx.model.name, body.model)
    session_id = session_of(body, x_engram_session)
    request = turn_request(body, session_id, idempotency_key)
    if session_id is None:  # stateless: the client sent the conversation, nothing is stored
        ctx = dataclasses.replace(ctx, memory=NullMemory())
    turn = await start_turn(ctx, request)
    created = now()
    headers = {
        "X-Engram-Turn-Id": turn.turn.turn_id,
        "X-Engram-Cache": turn.window.outcome,
        "X-Engram-History-Messages": str(len(turn.window.messages)),
    }
    if session_id is not None:
        headers["X-Engram-Session"] = session_id
        headers["X-Engram-Redis-Node"] = redis_node(ctx, session_id) or ""
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        return TurnStreamingResponse(turn, _chunks(turn, body.model, created, include_usage), headers)
    result = await turn.collect()
    return JSONResponse(completion(result, body.model, created), headers=headers)
