"""The echo model's answer: offline and deterministic, so tests and demos can see memory at work.

It quotes the previous user message of the conversation verbatim and says how many earlier messages it
was given, e.g.::

    You said before: "my name is Ada". I was given 2 earlier messages.

Plain functions over anything with ``role`` and ``content`` (Engram's messages, LlamaIndex's
``ChatMessage``): used by the service's echo model and by :class:`engram.llama_index.EchoLLM`.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from typing import Protocol

from engram.messages import SUMMARY_PREFIX

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
    count += summary_note(messages, SUMMARY_PREFIX)
    previous = next((m.content or "" for m in reversed(earlier) if _role(m) == "user"), None)
    if previous is None:
        return f"{FIRST_TURN} {count}"
    frame = f'You said before: "". {count}'
    quote = _fit(previous, max_reply_bytes - len(frame.encode("utf-8")))
    return f'You said before: "{quote}". {count}'


def echo_pieces(text: str) -> list[str]:
    """``text`` cut into the pieces the echo model streams (a word with its trailing space each)."""
    return _PIECES.findall(text) or [text]


# --- the echo model's summary: a deterministic extract, so tests can see what a summary covers ------------
SUMMARY_NOTE = ' I was also given a summary: "{}".'
_SUMMARY_HEADER = re.compile(r"\[summary of (\d+) messages through (\S+)\]")
_DROPPED = "… (earlier folds dropped)"
_EXTRACT_CHARS = 24


class IdentifiedMessage(Message, Protocol):
    """A stored message: what a summarizer folds (its id says which one)."""

    @property
    def id(self) -> str: ...


def echo_summary(
    previous: str, messages: Sequence[IdentifiedMessage], max_tokens: int, count_tokens: Callable[[str], int]
) -> str:
    """``previous`` with ``messages`` folded in: a header ``[summary of N messages through <id>]``, then one
    line per fold, ``<first id>..<last id> (<count>): <each user message's first 24 characters> | ...``.
    Over ``max_tokens``, the oldest fold lines give way (the header keeps the whole count)."""
    lines = previous.splitlines()
    header = _SUMMARY_HEADER.fullmatch(lines[0]) if lines else None
    covered = int(header[1]) if header else 0
    folds = [line for line in lines[1:] if line != _DROPPED]
    extract = " | ".join((m.content or "")[:_EXTRACT_CHARS] for m in messages if _role(m) == "user")
    folds.append(f"{messages[0].id}..{messages[-1].id} ({len(messages)}): {extract}")
    top = f"[summary of {covered + len(messages)} messages through {messages[-1].id}]"
    dropped = lines[1:2] == [_DROPPED]
    while True:
        text = "\n".join([top, *([_DROPPED] if dropped else []), *folds])
        if count_tokens(text) <= max_tokens or not folds:
            return text
        folds.pop(0)
        dropped = True


def summary_note(messages: Sequence[Message], prefix: str) -> str:
    """What the echo reply says about a summary among ``messages`` (a system message opening with
    ``prefix``): its first line quoted, so a test can tell which summary reached the prompt."""
    for message in messages:
        content = message.content or ""
        if _role(message) == "system" and content.startswith(prefix):
            first = content[len(prefix) :].strip().split("\n", 1)[0]
            return SUMMARY_NOTE.format(first[:200])
    return ""
