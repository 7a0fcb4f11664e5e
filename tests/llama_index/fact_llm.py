"""An offline LlamaIndex LLM that answers fact-extraction prompts deterministically, for tests.

Extraction: every user message handed to it (before the prompt) is one fact, its text. Condensing: the
existing facts joined in groups (``"a; b"``) of at least two and as many as it takes to answer with fewer
than the prompt's ``max_facts``: every fact's text survives inside a condensed fact, and the count halves.
Answers in the XML that ``FactExtractionMemoryBlock`` parses.
"""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from llama_index.core.base.llms.types import (
    ChatMessage,
    ChatResponse,
    CompletionResponse,
    CompletionResponseGen,
    LLMMetadata,
)
from llama_index.core.bridge.pydantic import PrivateAttr
from llama_index.core.llms.callbacks import llm_chat_callback
from llama_index.core.llms.custom import CustomLLM

CONDENSE_MARKER = "fact condensing system"
_EXISTING = re.compile(r"<existing_facts>(.*?)</existing_facts>", re.DOTALL)
_FACT = re.compile(r"<fact>(.*?)</fact>", re.DOTALL)
_BOUND = re.compile(r"fewer than (\d+) facts")


def as_xml(facts: Sequence[str]) -> str:
    return "<facts>" + "".join(f"<fact>{fact}</fact>" for fact in facts) + "</facts>"


def condense(facts: Sequence[str], max_facts: int) -> list[str]:
    size = max(2, -(-len(facts) // max(1, max_facts - 1)))
    return ["; ".join(facts[n : n + size]) for n in range(0, len(facts), size)]


def pieces(facts: Sequence[str]) -> list[str]:
    """The extracted facts inside condensed ones."""
    return [piece for fact in facts for piece in fact.split("; ")]


class FactLLM(CustomLLM):
    """Deterministic fact extraction and condensing; ``before_condense`` (an async hook, not pickled) runs
    inside a condensing call, between the block's read of the facts and its write: a concurrent replica."""

    _before_condense: Callable[[], Awaitable[None]] | None = PrivateAttr(default=None)

    def hook(self, before_condense: Callable[[], Awaitable[None]] | None) -> FactLLM:
        self._before_condense = before_condense
        return self

    def __getstate__(self) -> dict[str, Any]:
        state = super().__getstate__()
        state["__pydantic_private__"] = {**(state.get("__pydantic_private__") or {}), "_before_condense": None}
        return state

    @property
    def metadata(self) -> LLMMetadata:
        return LLMMetadata(is_chat_model=True, model_name="facts")

    def _answer(self, messages: Sequence[ChatMessage]) -> str:
        prompt = messages[-1].content or ""
        if CONDENSE_MARKER in prompt:
            existing, bound = _EXISTING.search(prompt), _BOUND.search(prompt)
            facts = [f.strip() for f in _FACT.findall(existing.group(1) if existing else "")]
            return as_xml(condense(facts, int(bound.group(1)) if bound else len(facts)))
        return as_xml([m.content.strip() for m in messages[:-1] if m.role == "user" and m.content])

    @llm_chat_callback()
    def chat(self, messages: Sequence[ChatMessage], **kwargs: Any) -> ChatResponse:
        return ChatResponse(message=ChatMessage(role="assistant", content=self._answer(messages)))

    @llm_chat_callback()
    async def achat(self, messages: Sequence[ChatMessage], **kwargs: Any) -> ChatResponse:
        hook = self._before_condense
        if hook is not None and CONDENSE_MARKER in (messages[-1].content or ""):
            self._before_condense = None  # once
            await hook()
        return ChatResponse(message=ChatMessage(role="assistant", content=self._answer(messages)))

    def complete(self, prompt: str, formatted: bool = False, **kwargs: Any) -> CompletionResponse:
        return CompletionResponse(text=prompt)

    def stream_complete(self, prompt: str, formatted: bool = False, **kwargs: Any) -> CompletionResponseGen:
        yield CompletionResponse(text=prompt, delta=prompt)
