"""The rolling summary: messages that fall out of the window are folded into one durable summary per session.

Shared by the service (background tasks after a turn's commit, :mod:`engram.server.summaries`) and the
LlamaIndex memory (``EngramMemory(summarize=True)``). One advance:

1. read the summary (it covers the log through ``covers_through``) and the session's epoch;
2. read the next messages after ``covers_through`` that are older than the window (a bounded batch);
3. ask the summarizer to fold them into the text (no Redis connection is held meanwhile);
4. compare-and-set (``engram_v4_summary_advance``): written only if the summary still covers through the
   same id under the same epoch, ``messages_covered`` growing by exactly the batch. A summarizer that lost
   the race drops its result; so concurrent replicas never fold a message twice, and never skip one.

Each message is read and folded once: the work per message summarized is O(1), never a re-summary of
the whole history. See docs/design.md, "Rolling summary".
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal, Protocol

from engram.history.store import HistoryStore
from engram.messages import SUMMARY_PREFIX, SessionSummary, StoredMessage
from engram.tokens import Tokenizer

DEFAULT_SUMMARY_MAX_TOKENS = 512
DEFAULT_SUMMARY_BATCH = 16  # messages out of the window before a summarizer is started
MAX_FOLD = 64  # messages folded per summarizer call
MAX_ROUNDS = 16  # summarizer calls per advance (a backlog is worked off over several turns)


class Summarize(Protocol):
    """Folds ``messages`` (oldest first) into the summary ``previous``; the result should stay within
    ``max_tokens`` (it is clipped to it)."""

    async def __call__(self, previous: str, messages: Sequence[StoredMessage], max_tokens: int) -> str: ...


@dataclass(frozen=True, slots=True)
class SummaryBudget:
    """How a token limit is shared in summary mode: the summary is given up to ``summary_tokens`` (at most
    half the limit), the window the rest. The window's budget is fixed, so what falls out of it is
    well defined and the tail cache keeps one budget per session."""

    summary_tokens: int
    window_tokens: int

    @classmethod
    def of(cls, token_limit: int, summary_max_tokens: int = DEFAULT_SUMMARY_MAX_TOKENS) -> SummaryBudget:
        summary = max(0, min(summary_max_tokens, token_limit // 2))
        return cls(summary, token_limit - summary)


def summary_prompt_text(summary: SessionSummary) -> str:
    """The system message that gives a model the summary (empty string: no summary yet)."""
    return f"{SUMMARY_PREFIX}\n{summary.text}" if summary.text else ""


def clip_to_tokens(text: str, max_tokens: int, count_tokens: Tokenizer) -> str:
    """``text``, cut at the end to at most ``max_tokens`` (a summarizer asked to stay within a budget may not)."""
    tokens = count_tokens(text)
    while tokens > max_tokens and text:
        text = text[: max(0, int(len(text) * max_tokens / tokens) - 1)]
        tokens = count_tokens(text)
    return text


@dataclass(frozen=True, slots=True)
class Advance:
    """What one advance did: ``advanced`` (folded ``messages``), ``nothing`` to fold, ``conflict`` (another
    summarizer or a rewrite got there first: its result was dropped), or ``gone`` (no such session)."""

    outcome: Literal["advanced", "nothing", "conflict", "gone"]
    messages: int = 0
    calls: int = 0


async def advance_summary(
    store: HistoryStore,
    tenant: str,
    session_id: str,
    summarize: Summarize,
    budget: SummaryBudget,
    *,
    before: str | None = None,
    max_fold: int = MAX_FOLD,
    max_rounds: int = MAX_ROUNDS,
) -> Advance:
    """Fold every uncovered message older than the window into the summary, ``max_fold`` per call.

    ``before`` is the id of the window's first message when the caller knows it (a turn's load);
    otherwise the window is loaded (one more round trip: ``asummarize``, tests, benchmarks).
    """
    folded = calls = 0
    outcome: Literal["advanced", "nothing", "conflict", "gone"] = "nothing"
    if before is None:
        window = await store.load_window(tenant, session_id, budget.window_tokens)
        if window.reaches_start or not window.messages:
            # everything fits: nothing has fallen out (what fell out before a rewrite is void with it)
            return Advance("nothing")
        before = window.messages[0].id
    for _ in range(max_rounds):
        current = await store.read_summary(tenant, session_id)
        if current is None:
            return Advance("gone", folded, calls)
        epoch, summary = current
        batch = await store.messages_after(tenant, session_id, summary.covers_through, before, max_fold)
        if not batch:
            break
        text = await summarize(summary.text, batch, budget.summary_tokens)
        calls += 1
        text = clip_to_tokens(text, budget.summary_tokens, store.count_tokens)
        written = await store.advance_summary(
            tenant, session_id, epoch, summary.covers_through, text, batch[-1].id, len(batch)
        )
        if not written:
            outcome = "conflict"
            break
        folded += len(batch)
        outcome = "advanced"
        if len(batch) < max_fold:
            break
    return Advance(outcome, folded, calls)
