"""OpenAI's chat-completions API in front of Engram's memory: the shapes, and how a request becomes a turn.

Memory rule (docs/service.md): with a session (the ``X-Engram-Session`` header, or ``metadata.session_id``)
the client sends only its new user message; Engram puts the session's memory in front of it and commits
the turn exactly as ``/v1/chat`` does. Of the request's ``messages`` Engram uses the system and developer
messages (instructions for this turn, never stored) and the last message, which must be the user's; any
earlier user or assistant message is ignored, so a client that sends its whole history anyway never
stores a message twice. Without a session the request is passed to the model as sent and nothing is
stored. ``Idempotency-Key`` is the turn id: a retry with it is answered once and stored once.
"""

from __future__ import annotations

import time
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from engram.errors import InvalidMessage
from engram.server.model import ModelOptions, PromptMessage
from engram.server.turn import TurnRequest, TurnResult

SESSION_HEADER = "X-Engram-Session"
IDEMPOTENCY_HEADER = "Idempotency-Key"
STATELESS_SESSION_ID = "openai-stateless"  # the session of a request without one (nothing is stored)
INSTRUCTION_ROLES = frozenset({"system", "developer"})


# --- requests -----------------------------------------------------------------------------------------
class ContentPart(BaseModel):
    model_config = ConfigDict(extra="allow")
    type: str = Field(description="only `text` parts are accepted")
    text: str | None = None


class RequestMessage(BaseModel):
    model_config = ConfigDict(extra="allow")  # name, tool_call_id, ...: accepted, not used
    role: Literal["system", "developer", "user", "assistant", "tool", "function"]
    content: str | list[ContentPart] | None = None


class StreamOptions(BaseModel):
    include_usage: bool = Field(False, strict=True)


class ChatCompletionRequest(BaseModel):
    """OpenAI's request body. Other OpenAI parameters (top_p, seed, stop, ...) are accepted and not used."""

    model_config = ConfigDict(extra="allow")
    model: str = Field(description="the served model's id (GET /v1/models)")
    messages: list[RequestMessage] = Field(
        min_length=1, description="with a session: the new user message last, optionally system messages"
    )
    stream: bool = Field(False, strict=True)
    stream_options: StreamOptions | None = None
    temperature: float | None = Field(None, ge=0, le=2)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    n: int | None = Field(None, ge=1, le=1, description="one choice only")
    user: str | None = None
    metadata: dict[str, str] | None = Field(
        None,
        description="`session_id` here names the session too; `subject` links it to an end user (erasure by subject)",
    )


def _text(message: RequestMessage, index: int) -> str:
    if message.content is None:
        return ""
    if isinstance(message.content, str):
        return message.content
    parts = []
    for part in message.content:
        if part.type != "text" or part.text is None:
            raise InvalidMessage(f"messages[{index}]: only text content parts are supported, got {part.type!r}")
        parts.append(part.text)
    return "".join(parts)


def session_of(body: ChatCompletionRequest, header: str | None) -> str | None:
    """The session named by the header, else by ``metadata.session_id``; None: no memory."""
    if header is not None:
        return header
    return (body.metadata or {}).get("session_id")


def turn_request(body: ChatCompletionRequest, session_id: str | None, idempotency_key: str | None) -> TurnRequest:
    """The turn a request asks for (see the module's memory rule). Raises InvalidMessage. Without a
    session the caller must give the turn a memory that stores nothing (NullMemory)."""
    last = body.messages[-1]
    if last.role != "user":
        raise InvalidMessage(f"messages: the last message must be the user's new message, not {last.role!r}")
    texts = [_text(m, i) for i, m in enumerate(body.messages)]
    options = ModelOptions(body.temperature, body.max_completion_tokens or body.max_tokens)
    earlier = [PromptMessage(m.role, t) for m, t in zip(body.messages[:-1], texts, strict=False)]
    if session_id is None:  # passed through: the model gets the request's messages as sent
        return TurnRequest(STATELESS_SESSION_ID, texts[-1], idempotency_key, prefix=tuple(earlier), options=options)
    instructions = tuple(m for m in earlier if m.role in INSTRUCTION_ROLES)
    subject = (body.metadata or {}).get("subject")
    return TurnRequest(session_id, texts[-1], idempotency_key, prefix=instructions, options=options, subject=subject)


# --- answers ------------------------------------------------------------------------------------------
def completion_id(turn_id: str) -> str:
    """Stable per turn: a retry with the same Idempotency-Key gets the same id."""
    return f"chatcmpl-{turn_id}"


def usage(result: TurnResult) -> dict[str, int]:
    """Token counts as Engram stores them (tiktoken cl100k_base), not the model's own tokenizer."""
    return {
        "prompt_tokens": result.prompt_tokens,
        "completion_tokens": result.reply_tokens,
        "total_tokens": result.prompt_tokens + result.reply_tokens,
    }


def _envelope(completion_id_: str, kind: str, model: str, created: int) -> dict[str, Any]:
    return {"id": completion_id_, "object": kind, "created": created, "model": model}


def completion(result: TurnResult, model: str, created: int) -> dict[str, Any]:
    choice = {
        "index": 0,
        "message": {"role": "assistant", "content": result.reply, "refusal": None},
        "logprobs": None,
        "finish_reason": "stop",
    }
    envelope = _envelope(completion_id(result.turn_id), "chat.completion", model, created)
    return {**envelope, "choices": [choice], "usage": usage(result)}


def chunk(chunk_id: str, model: str, created: int, delta: dict[str, str], finish: str | None) -> dict[str, Any]:
    choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
    return {**_envelope(chunk_id, "chat.completion.chunk", model, created), "choices": [choice]}


def usage_chunk(result: TurnResult, model: str, created: int) -> dict[str, Any]:
    """The last chunk when ``stream_options.include_usage``: no choices, the turn's usage."""
    envelope = _envelope(completion_id(result.turn_id), "chat.completion.chunk", model, created)
    return {**envelope, "choices": [], "usage": usage(result)}


def models_list(model: str, created: int) -> dict[str, Any]:
    return {"object": "list", "data": [model_card(model, created)]}


def model_card(model: str, created: int) -> dict[str, Any]:
    return {"id": model, "object": "model", "created": created, "owned_by": "engram"}


def now() -> int:
    return int(time.time())
