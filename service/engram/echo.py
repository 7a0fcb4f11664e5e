"""The echo model's answer: offline and deterministic, so tests and demos can see memory at work.

It quotes the previous user message of the conversation verbatim and says how many earlier messages it
was given, e.g.::

    You said before: "my name is Ada". I was given 2 earlier messages.

Plain functions over anything with ``role`` and ``content`` (Engram's messages, LlamaIndex's
``ChatMessage``): used by the service's echo model and by :class:`engram.llama_index.EchoLLM`.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Protocol

FIRST_TURN = "This is the start of our conversation."
_PIECES = re.compile(r"\S+\s*|\s+")
_TRUNCATION = "… [{} more bytes]"
_INSTRUCTION_ROLES = frozenset({"system", "developer"})


class Message(Protocol):
    """What a model reads of a message (Engram's stored messages, LlamaIndex's ``ChatMessage``): they are
    given to it as they are, not copied."""

    @property
    def role(self) -> str: ...
    @property
    def content(self) -> str | None: ...


def _role(message: Message) -> str:
    role = message.role  # LlamaIndex's MessageRole is a str enum: its value, not str(), is the name
    return str(getattr(role, "value", role))


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


def echo_reply(messages: Sequence[Message], max_reply_bytes: int = 32 * 1024) -> str:
    """The echo model's answer to ``messages`` (the window of history, then the new user message)."""
    conversation = [m for m in messages if _role(m) not in _INSTRUCTION_ROLES]
    earlier = conversation[:-1] if conversation and _role(conversation[-1]) == "user" else conversation
    count = f"I was given {_plural(len(earlier), 'earlier message')}."
    previous = next((m.content or "" for m in reversed(earlier) if _role(m) == "user"), None)
    if previous is None:
        return f"{FIRST_TURN} {count}"
    frame = f'You said before: "". {count}'
    quote = _fit(previous, max_reply_bytes - len(frame.encode("utf-8")))
    return f'You said before: "{quote}". {count}'


def echo_pieces(text: str) -> list[str]:
    """``text`` cut into the pieces the echo model streams (a word with its trailing space each)."""
    return _PIECES.findall(text) or [text]
