"""The models the service can talk to: ``echo`` (offline, deterministic) and any OpenAI-compatible server.

The echo model makes memory visible without a real model: its reply quotes the previous user message
of the conversation verbatim and says how many earlier messages it was given, e.g.::

    You said before: "my name is Ada". I was given 2 earlier messages.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

from llama_index.core.base.llms.types import (
    ChatMessage,
    ChatResponse,
    ChatResponseAsyncGen,
    ChatResponseGen,
    CompletionResponse,
    CompletionResponseGen,
    LLMMetadata,
    MessageRole,
)
from llama_index.core.bridge.pydantic import Field
from llama_index.core.llms import LLM, CustomLLM
from llama_index.core.llms.callbacks import llm_chat_callback, llm_completion_callback

from engram.server.config import check_llm_settings
from engram.settings import Settings

FIRST_TURN = "This is the start of our conversation."
_PIECES = re.compile(r"\S+\s*|\s+")
_TRUNCATION = "… [{} more bytes]"


def _plural(count: int, word: str) -> str:
    return f"{count} {word}" if count == 1 else f"{count} {word}s"


def _fit(text: str, max_bytes: int) -> str:
    """``text`` if it fits ``max_bytes`` of UTF-8, else its longest prefix that does plus a marker."""
    raw = text.encode("utf-8")
    if len(raw) <= max_bytes:
        return text
    marker_room = len(_TRUNCATION.format(len(raw)).encode("utf-8"))
    keep = raw[: max(0, max_bytes - marker_room)].decode("utf-8", errors="ignore")
    return keep + _TRUNCATION.format(len(raw) - len(keep.encode("utf-8")))


def echo_reply(messages: Sequence[ChatMessage], max_reply_bytes: int = 32 * 1024) -> str:
    """The echo model's answer to ``messages`` (the window of history, then the new user message)."""
    conversation = [m for m in messages if m.role not in (MessageRole.SYSTEM, MessageRole.DEVELOPER)]
    earlier = conversation[:-1] if conversation and conversation[-1].role == MessageRole.USER else conversation
    count = f"I was given {_plural(len(earlier), 'earlier message')}."
    previous = next((m.content or "" for m in reversed(earlier) if m.role == MessageRole.USER), None)
    if previous is None:
        return f"{FIRST_TURN} {count}"
    frame = f'You said before: "". {count}'
    quote = _fit(previous, max_reply_bytes - len(frame.encode("utf-8")))
    return f'You said before: "{quote}". {count}'


def _pieces(text: str) -> list[str]:
    return _PIECES.findall(text) or [text]


class EchoLLM(CustomLLM):
    """An offline, deterministic chat model: quotes the previous user message, counts the history."""

    max_reply_bytes: int = Field(default=32 * 1024, gt=64, description="replies are cut to fit this")

    @classmethod
    def class_name(cls) -> str:
        return "EngramEchoLLM"

    @property
    def metadata(self) -> LLMMetadata:
        return LLMMetadata(context_window=1_000_000, num_output=4096, is_chat_model=True, model_name="echo")

    def _message(self, messages: Sequence[ChatMessage]) -> ChatMessage:
        return ChatMessage(role=MessageRole.ASSISTANT, content=echo_reply(messages, self.max_reply_bytes))

    def _stream(self, messages: Sequence[ChatMessage]) -> list[ChatResponse]:
        text, so_far, responses = echo_reply(messages, self.max_reply_bytes), "", []
        for piece in _pieces(text):
            so_far += piece
            responses.append(ChatResponse(message=ChatMessage(role=MessageRole.ASSISTANT, content=so_far), delta=piece))
        return responses

    # Each entry point answers directly (none calls another), so LlamaIndex announces one call per turn.
    @llm_chat_callback()
    def chat(self, messages: Sequence[ChatMessage], **kwargs: Any) -> ChatResponse:
        return ChatResponse(message=self._message(messages))

    @llm_chat_callback()
    async def achat(self, messages: Sequence[ChatMessage], **kwargs: Any) -> ChatResponse:
        return ChatResponse(message=self._message(messages))

    @llm_chat_callback()
    def stream_chat(self, messages: Sequence[ChatMessage], **kwargs: Any) -> ChatResponseGen:
        yield from self._stream(messages)

    @llm_chat_callback()
    async def astream_chat(self, messages: Sequence[ChatMessage], **kwargs: Any) -> ChatResponseAsyncGen:
        responses = self._stream(messages)

        async def gen() -> ChatResponseAsyncGen:
            for response in responses:
                yield response

        return gen()

    @llm_completion_callback()
    def complete(self, prompt: str, formatted: bool = False, **kwargs: Any) -> CompletionResponse:
        return CompletionResponse(text=echo_reply([ChatMessage(role=MessageRole.USER, content=prompt)]))

    @llm_completion_callback()
    def stream_complete(self, prompt: str, formatted: bool = False, **kwargs: Any) -> CompletionResponseGen:
        text = echo_reply([ChatMessage(role=MessageRole.USER, content=prompt)])
        yield CompletionResponse(text=text, delta=text)


def build_llm(settings: Settings) -> LLM:
    """The LlamaIndex LLM that ``ENGRAM_LLM`` selects."""
    check_llm_settings(settings)
    if settings.llm == "echo":
        return EchoLLM(max_reply_bytes=settings.max_message_bytes)
    from llama_index.llms.openai_like import OpenAILike  # type: ignore[import-untyped]  # deferred: openai client

    api_key = settings.llm_api_key.get_secret_value() if settings.llm_api_key else "unused"
    llm: LLM = OpenAILike(
        model=settings.llm_model,
        api_base=settings.llm_base_url,
        api_key=api_key,
        timeout=settings.llm_timeout,
        max_retries=1,
        is_chat_model=True,
        context_window=max(settings.token_limit * 2, 4096),
    )
    return llm
