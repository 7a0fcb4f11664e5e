"""``ENGRAM_MEMORY=summary`` in the service: the turn's memory, and the summaries advanced in the background.

:class:`SummaryMemory` is the turn's :class:`~engram.server.turn.TurnMemory`: its load is the same single
round trip as the window's, with the summary in the reply (and whether a batch of messages has fallen out
of the window unsummarized); its commit is the same single round trip, after which, when the load said so,
it hands the session to :class:`BackgroundSummaries` and returns. The turn never waits for a summary.

:class:`BackgroundSummaries` runs :func:`engram.history.summary.advance_summary` as asyncio tasks of the
replica: at most one per session per process, at most ``ENGRAM_SUMMARY_CONCURRENCY`` at once (a turn that
finds the cap reached schedules nothing: a later turn of the session will), errors logged and counted
(``engram_summary_runs_total{outcome}``), never reaching a turn. Replicas racing on one session are
kept apart by the compare-and-set in Redis, not here.
"""

from __future__ import annotations

import asyncio
import logging
import time

from engram.history.store import HistoryStore
from engram.history.summary import SummaryBudget, advance_summary
from engram.messages import CommittedTurn, NewMessage, SessionSummary, Window
from engram.policy import Tenant
from engram.server import metrics
from engram.server.errors import redact
from engram.server.model import ChatModel

log = logging.getLogger("engram.server")


class BackgroundSummaries:
    """The summaries this process is advancing (one asyncio task per session)."""

    def __init__(self, store: HistoryStore, model: ChatModel, *, max_tokens: int, batch: int, concurrency: int) -> None:
        self.store = store
        self.model = model
        self.max_tokens = max_tokens
        self.batch = batch
        self.concurrency = concurrency
        self._tasks: dict[tuple[str, str], asyncio.Task[None]] = {}

    def budget(self, token_limit: int) -> SummaryBudget:
        return SummaryBudget.of(token_limit, self.max_tokens)

    def schedule(self, tenant: str, session_id: str, budget: SummaryBudget, before: str) -> bool:
        """Start advancing the session's summary up to ``before`` (the first message of the window the turn
        loaded), unless this process already is or is at its cap. Returns whether a task was started."""
        key = (tenant, session_id)
        if key in self._tasks or len(self._tasks) >= self.concurrency:
            metrics.observe_summary("skipped")
            return False
        task = asyncio.get_running_loop().create_task(self._advance(tenant, session_id, budget, before))
        self._tasks[key] = task
        task.add_done_callback(lambda _: self._tasks.pop(key, None))
        return True

    async def _advance(self, tenant: str, session_id: str, budget: SummaryBudget, before: str) -> None:
        started = time.perf_counter()
        try:
            with metrics.redis_operation("summary"):
                advance = await advance_summary(
                    self.store, tenant, session_id, self.model.summarize, budget, before=before
                )
        except Exception as error:  # a summary failing must never reach a turn: logged, counted, retried later
            log.warning("summary of a session failed: %s", redact(f"{type(error).__name__}: {error}"))
            metrics.observe_summary("error", seconds=time.perf_counter() - started)
            return
        metrics.observe_summary(advance.outcome, advance.messages, time.perf_counter() - started)

    async def drain(self) -> None:
        """Wait for what is running to finish (tests; a shutdown cancels instead)."""
        await asyncio.gather(*self._tasks.values(), return_exceptions=True)

    async def aclose(self) -> None:
        """Stop what is running (at shutdown): an advance cut short writes nothing (its CAS never ran)."""
        tasks = list(self._tasks.values())
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


class SummaryMemory:
    """A turn's memory in summary mode: the window (its budget less the summary's share) and the summary,
    in one load; the commit, then a background advance when the load found a batch out of the window."""

    def __init__(self, store: HistoryStore, tenant: Tenant, summaries: BackgroundSummaries) -> None:
        self.store, self.tenant, self.summaries = store, tenant, summaries
        self._window: Window | None = None

    async def load(self, session_id: str, token_limit: int, turn_id: str) -> Window:
        budget = self.summaries.budget(token_limit)
        self._window = await self.store.load_window(
            self.tenant.name,
            session_id,
            budget.window_tokens,
            turn_id=turn_id,
            summary_batch=self.summaries.batch,
            policy=self.tenant.policy,
        )
        return self._window

    async def commit(
        self, session_id: str, turn_id: str, user: NewMessage, reply: NewMessage, subject: str | None
    ) -> CommittedTurn:
        name, policy = self.tenant.name, self.tenant.policy
        committed = await self.store.commit_turn(name, session_id, turn_id, user, reply, policy, subject=subject)
        window = self._window
        summary = window.summary if window is not None else None
        if window is not None and summary is not None and summary.due and window.messages:
            budget = self.summaries.budget(self.tenant.policy.token_limit)
            self.summaries.schedule(self.tenant.name, session_id, budget, window.messages[0].id)
        return committed


async def session_summary(store: HistoryStore, tenant: str, session_id: str) -> SessionSummary | None:
    """The session's summary as stored (empty when none was made yet), or None when there is no such session."""
    found = await store.read_summary(tenant, session_id)
    return found[1] if found is not None else None
