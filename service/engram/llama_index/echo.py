"""``EchoLLM``: an offline, deterministic LlamaIndex LLM for tests and demos of memory (see :mod:`engram.echo`)."""

from __future__ import annotations

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
from llama_index.core.llms import CustomLLM
from llama_index.core.llms.callbacks import llm_chat_callback, llm_completion_callback

from engram.echo import echo_pieces, echo_reply


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
        for piece in echo_pieces(text):
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
