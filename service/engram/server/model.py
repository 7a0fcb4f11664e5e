"""The model a chat turn talks to: ``echo`` (offline, deterministic) or any OpenAI-compatible server.

Both are a :class:`ChatModel`: ``stream(messages)`` is an async generator of the reply's text pieces.
Every turn streams (a JSON answer is the stream collected), and the turn reads the stream in its own
task: closing the generator closes the upstream HTTP response, so a reply nobody waits for stops being
generated (and billed).

The service talks to models with the ``openai`` SDK directly (imported only when configured), not
through LlamaIndex: a replica then starts without importing LlamaIndex at all (about a second less to
ready and tens of MiB less per worker; see docs/benchmarks.md). Library users keep any LlamaIndex LLM.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from engram.echo import Message, echo_pieces, echo_reply, echo_summary
from engram.messages import StoredMessage
from engram.server.config import check_llm_settings
from engram.settings import Settings

# Roles of stored messages as OpenAI's chat API knows them. Tool results are stored without the call
# they answer (LlamaIndex adapters may write them), so they are given to the model as user text.
_OPENAI_ROLES = {"system": "system", "developer": "developer", "user": "user", "assistant": "assistant"}
_ANSWER_ALIASES = frozenset({"chatbot", "model"})


@dataclass(frozen=True, slots=True)
class PromptMessage:
    """A message of the prompt that is not stored (the new message, a request's instructions)."""

    role: str
    content: str


@dataclass(frozen=True, slots=True)
class ModelOptions:
    """Sampling settings a client may set per request (None: the model server's default)."""

    temperature: float | None = None
    max_tokens: int | None = None


NO_OPTIONS = ModelOptions()


class ChatModel(Protocol):
    name: str

    def stream(self, messages: Sequence[Message], options: ModelOptions = NO_OPTIONS) -> AsyncGenerator[str, None]:
        """The reply to ``messages``, piece by piece (pieces may be empty)."""
        ...

    async def summarize(self, previous: str, messages: Sequence[StoredMessage], max_tokens: int) -> str:
        """``previous`` (the rolling summary) with ``messages`` folded in, in at most ``max_tokens``
        (off the hot path: see engram.history.summary)."""
        ...

    async def aclose(self) -> None:
        """Release the model's connections (at shutdown)."""
        ...


SUMMARIZE_INSTRUCTIONS = (
    "You keep a running summary of a conversation between a user and an assistant. Fold the new messages "
    "into the summary: keep facts, names, decisions, open questions and the user's preferences; drop "
    "pleasantries. Answer with the updated summary only, in at most {max_tokens} tokens."
)


class EchoModel:
    """Quotes the previous user message and counts the history (see :mod:`engram.echo`)."""

    name = "echo"

    def __init__(self, max_reply_bytes: int = 32 * 1024) -> None:
        self.max_reply_bytes = max_reply_bytes

    async def stream(
        self, messages: Sequence[Message], options: ModelOptions = NO_OPTIONS
    ) -> AsyncGenerator[str, None]:
        for piece in echo_pieces(echo_reply(messages, self.max_reply_bytes)):
            yield piece

    async def summarize(self, previous: str, messages: Sequence[StoredMessage], max_tokens: int) -> str:
        """A deterministic extract (see :func:`engram.echo.echo_summary`): which messages, by id."""
        from engram.tokens import default_tokenizer

        return echo_summary(previous, messages, max_tokens, default_tokenizer())

    async def aclose(self) -> None:
        return None


def openai_message(message: Message) -> dict[str, str]:
    content = message.content or ""
    role = _OPENAI_ROLES.get(message.role)
    if role is not None:
        return {"role": role, "content": content}
    if message.role in _ANSWER_ALIASES:
        return {"role": "assistant", "content": content}
    return {"role": "user", "content": f"[{message.role} result] {content}"}


class OpenAICompatibleModel:
    """A model behind an OpenAI-compatible ``/chat/completions`` (OpenAI, vLLM, Ollama, llama.cpp, ...)."""

    def __init__(self, *, base_url: str, model: str, api_key: str, timeout: float) -> None:
        from openai import AsyncOpenAI  # deferred: only a replica configured for it pays the import

        self.name = model
        # One retry, as the SDK's default of two would hold a turn (and its client) for three timeouts.
        self._client = AsyncOpenAI(base_url=base_url, api_key=api_key, timeout=timeout, max_retries=1)

    async def stream(
        self, messages: Sequence[Message], options: ModelOptions = NO_OPTIONS
    ) -> AsyncGenerator[str, None]:
        payload: Any = [openai_message(m) for m in messages]
        sampling: dict[str, Any] = {}
        if options.temperature is not None:
            sampling["temperature"] = options.temperature
        if options.max_tokens is not None:
            sampling["max_tokens"] = options.max_tokens  # the name every OpenAI-compatible server knows
        response = await self._client.chat.completions.create(
            model=self.name, messages=payload, stream=True, **sampling
        )
        try:
            async for chunk in response:
                if chunk.choices and chunk.choices[0].delta.content:
                    yield chunk.choices[0].delta.content
        finally:
            await response.close()  # also when the turn stops reading: the upstream request ends here

    async def summarize(self, previous: str, messages: Sequence[StoredMessage], max_tokens: int) -> str:
        new = "\n".join(f"{m.role}: {m.content}" for m in messages)
        payload: Any = [
            {"role": "system", "content": SUMMARIZE_INSTRUCTIONS.format(max_tokens=max_tokens)},
            {"role": "user", "content": f"Summary so far:\n{previous or '(none)'}\n\nNew messages:\n{new}"},
        ]
        response = await self._client.chat.completions.create(
            model=self.name, messages=payload, stream=False, max_tokens=max_tokens
        )
        return (response.choices[0].message.content or "").strip() if response.choices else ""

    async def aclose(self) -> None:
        await self._client.close()


def build_model(settings: Settings) -> ChatModel:
    """The model that ``ENGRAM_LLM`` selects."""
    check_llm_settings(settings)
    if settings.llm == "echo":
        return EchoModel(max_reply_bytes=settings.max_message_bytes)
    api_key = settings.llm_api_key.get_secret_value() if settings.llm_api_key else "unused"
    return OpenAICompatibleModel(
        base_url=str(settings.llm_base_url),
        model=str(settings.llm_model),
        api_key=api_key,
        timeout=settings.llm_timeout,
    )
