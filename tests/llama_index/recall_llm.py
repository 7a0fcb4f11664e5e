"""An offline LlamaIndex LLM for tests: it answers with what memory handed it, so recall is visible."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from llama_index.core.base.llms.types import (
    ChatMessage,
    ChatResponse,
    CompletionResponse,
    CompletionResponseGen,
    LLMMetadata,
)
from llama_index.core.llms.callbacks import llm_chat_callback
from llama_index.core.llms.custom import CustomLLM


def recall_reply(messages: Sequence[ChatMessage]) -> str:
    users = [m.content for m in messages if m.role == "user"]
    previous = users[-2] if len(users) > 1 else None
    return f"given {len(messages) - 1} earlier messages; previous user message: {previous!r}"


class RecallLLM(CustomLLM):
    fail: bool = False  # raise instead of answering: a model outage

    @property
    def metadata(self) -> LLMMetadata:
        return LLMMetadata(is_chat_model=True, model_name="recall")

    @llm_chat_callback()
    def chat(self, messages: Sequence[ChatMessage], **kwargs: Any) -> ChatResponse:
        if self.fail:
            raise RuntimeError("model unavailable")
        return ChatResponse(message=ChatMessage(role="assistant", content=recall_reply(messages)))

    @llm_chat_callback()
    async def achat(self, messages: Sequence[ChatMessage], **kwargs: Any) -> ChatResponse:
        return self.chat(messages, **kwargs)

    def complete(self, prompt: str, formatted: bool = False, **kwargs: Any) -> CompletionResponse:
        return CompletionResponse(text=prompt)

    def stream_complete(self, prompt: str, formatted: bool = False, **kwargs: Any) -> CompletionResponseGen:
        yield CompletionResponse(text=prompt, delta=prompt)
