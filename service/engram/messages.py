"""Plain data passed in and out of the history store."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

CacheOutcome = Literal["hit", "delta", "miss"]
# How a turn got its history: a cache outcome, or "off" when nothing was loaded (ENGRAM_MEMORY=off).
HistoryOutcome = Literal["hit", "delta", "miss", "off"]


def stream_id_key(message_id: str) -> tuple[int, int]:
    """Sort key of a Redis stream id ``"<ms>-<seq>"``."""
    ms, _, seq = message_id.partition("-")
    return int(ms), int(seq or 0)


@dataclass(frozen=True, slots=True)
class StoredMessage:
    """A message as stored: ``id`` is the server-assigned stream id, so ids sort in commit order."""

    id: str
    role: str
    content: str
    tokens: int
    turn_id: str | None = None
    extra: str | None = None  # JSON of LlamaIndex additional_kwargs / blocks, when there are any

    @property
    def created_at(self) -> float:
        """Commit time in seconds since the epoch (from the stream id's millisecond part)."""
        return stream_id_key(self.id)[0] / 1000.0


@dataclass(frozen=True, slots=True)
class NewMessage:
    """A message to append. ``tokens`` is counted once: by :meth:`HistoryStore.prepare` (so a caller
    that needs the count before committing does not count twice), else by the store at write time."""

    role: str
    content: str
    extra: str | None = None
    tokens: int | None = None


# Opens the system message that gives a model the rolling summary, before the window.
SUMMARY_PREFIX = "Summary of the earlier conversation:"


@dataclass(frozen=True, slots=True)
class SessionSummary:
    """A session's rolling summary (docs/design.md, "Rolling summary"): ``text`` covers every stored
    message up to and including ``covers_through`` (None: nothing yet), ``messages_covered`` of them."""

    text: str = ""
    covers_through: str | None = None
    messages_covered: int = 0
    tokens: int = 0
    # set by a load: at least a batch of messages older than the window is not covered yet
    due: bool = False


@dataclass(frozen=True, slots=True)
class Window:
    """The newest messages of a session that fit a token budget, oldest first."""

    messages: list[StoredMessage]
    outcome: HistoryOutcome
    tokens: int
    replay: CommittedTurn | None = None  # set when load_window(turn_id=...) found that turn committed
    # Every message that fit the budget, before the window dropped an unanswerable start (assistant/tool).
    fitted: tuple[StoredMessage, ...] = ()
    reaches_start: bool = True  # fitted begins at the session's first message (or the session is empty)
    summary: SessionSummary | None = None  # loaded with the window when asked for (summary mode)


@dataclass(frozen=True, slots=True)
class Usage:
    """What a tenant stores, as its quotas count it."""

    stored_bytes: int  # role, content and extra of every message, archived ones included
    sessions: int


@dataclass(frozen=True, slots=True)
class CommittedTurn:
    """What a commit stored. ``duplicate`` is True when the turn id was already committed: the
    messages are then the ones stored the first time and nothing new was written. ``usage`` is the
    tenant's after this commit (None for a duplicate)."""

    turn_id: str
    messages: list[StoredMessage]
    duplicate: bool = False
    usage: Usage | None = None

    @property
    def reply(self) -> str:
        assistant = [m for m in self.messages if m.role == "assistant"]
        return assistant[-1].content if assistant else ""


@dataclass(frozen=True, slots=True)
class MessagePage:
    messages: list[StoredMessage]
    next_cursor: str | None


@dataclass(frozen=True, slots=True)
class SessionInfo:
    session_id: str
    messages: int
    updated_at: float  # seconds since the epoch
    label: str | None = None  # the LlamaIndex key a hashed session id stands for (llama_index/keys.py)


@dataclass(frozen=True, slots=True)
class SessionPage:
    sessions: list[SessionInfo] = field(default_factory=list)
    next_cursor: str | None = None
