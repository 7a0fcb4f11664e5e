"""``engram loadgen``: drive conversations against a running service and check every reply's memory.

``concurrency`` conversations run at once, each sending its ``turns`` messages one after the other
(a conversation is sequential by nature). Every follow-up turn is checked: the reply must say the model
was given earlier messages and, with the echo model, must quote the previous message verbatim.

Every request carries ``X-Session-Id: <session id>``, which the service ignores: it lets a load balancer
keep a conversation on one replica (``LB_AFFINITY=session`` in ``scripts/run-local.sh``) for comparison.
"""

from __future__ import annotations

import asyncio
import json
import math
import sys
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, TextIO

import httpx

ECHO_PREFIXES = ('You said before: "', "This is the start of our conversation.")
MAX_EXAMPLES = 5
SESSION_HEADER = "X-Session-Id"


def percentile(sorted_values: list[float], fraction: float) -> float:
    """Nearest-rank percentile of an ascending list (0.0 for an empty one)."""
    if not sorted_values:
        return 0.0
    rank = max(1, math.ceil(fraction * len(sorted_values)))
    return sorted_values[min(rank, len(sorted_values)) - 1]


def saw_previous(reply: str, history_messages: int, previous_message: str) -> bool:
    """Did a follow-up turn see the turn before it? Any model: it was given at least that user message
    and its reply. The echo model also quotes the previous user message, which is checked verbatim."""
    if history_messages < 2:
        return False
    if reply.startswith(ECHO_PREFIXES):
        return f'"{previous_message}"' in reply
    return True


@dataclass
class LoadReport:
    url: str
    sessions: int
    turns_per_session: int
    concurrency: int
    keepalive: bool = True
    seconds: float = 0.0
    latencies: list[float] = field(default_factory=list)  # of successful turns, seconds
    cache: Counter[str] = field(default_factory=Counter)
    replicas: Counter[str] = field(default_factory=Counter)
    errors: Counter[str] = field(default_factory=Counter)
    follow_ups: int = 0
    recall_failures: list[str] = field(default_factory=list)

    @property
    def ok_turns(self) -> int:
        return len(self.latencies)

    @property
    def error_count(self) -> int:
        return sum(self.errors.values())

    @property
    def passed(self) -> bool:
        return self.error_count == 0 and not self.recall_failures and self.ok_turns > 0

    def summary(self) -> dict[str, Any]:
        ordered = sorted(self.latencies)
        return {
            "turns": self.ok_turns,
            "errors": self.error_count,
            "seconds": round(self.seconds, 3),
            "turns_per_second": round(self.ok_turns / self.seconds, 1) if self.seconds else 0.0,
            "p50_ms": round(percentile(ordered, 0.50) * 1000, 1),
            "p99_ms": round(percentile(ordered, 0.99) * 1000, 1),
            "cache": {k: self.cache.get(k, 0) for k in ("hit", "delta", "miss")} | dict(self.cache),
            "replicas": dict(self.replicas),
            "follow_ups": self.follow_ups,
            "recall_failures": len(self.recall_failures),
            "keepalive": self.keepalive,
        }

    def format(self) -> str:
        s = self.summary()
        ordered = sorted(self.latencies)
        total = max(1, sum(self.cache.values()))
        split = "  ".join(f"{k} {v} ({100 * v / total:.0f}%)" for k, v in s["cache"].items())
        lines = [
            f"engram loadgen: {self.sessions} sessions x {self.turns_per_session} turns, "
            f"concurrency {self.concurrency}, against {self.url}",
            f"turns      {s['turns']} ok, {s['errors']} errors in {s['seconds']:.2f} s"
            f" = {s['turns_per_second']} turns/s",
            f"latency    p50 {s['p50_ms']} ms  p90 {percentile(ordered, 0.9) * 1000:.1f} ms"
            f"  p99 {s['p99_ms']} ms  max {(ordered[-1] if ordered else 0) * 1000:.1f} ms",
            f"history    {split}",
            f"replicas   {len(self.replicas)}: "
            + ", ".join(f"{name} {count}" for name, count in self.replicas.most_common()),
        ]
        if self.errors:
            lines.append("errors     " + ", ".join(f"{kind} x{n}" for kind, n in self.errors.most_common()))
        if self.recall_failures:
            lines.append(
                f"recall     {len(self.recall_failures)} of {self.follow_ups} follow-up turns did NOT see the "
                "previous turn, e.g.:"
            )
            lines += [f"             {example}" for example in self.recall_failures[:MAX_EXAMPLES]]
        else:
            lines.append(f"recall     all {self.follow_ups} follow-up turns saw the previous turn")
        lines.append("result     " + ("PASS" if self.passed else "FAIL"))
        return "\n".join(lines)


def _error_kind(response: httpx.Response) -> str:
    try:
        code = response.json()["error"]["code"]
    except (ValueError, KeyError, TypeError):
        code = "no_error_body"
    return f"HTTP {response.status_code} {code}"


async def _conversation(client: httpx.AsyncClient, report: LoadReport, run_id: str, index: int, turns: int) -> None:
    session_id = f"loadgen-{run_id}-{index}"
    previous: str | None = None
    for turn in range(turns):
        message = f"loadgen {run_id} conversation {index} turn {turn} ({uuid.uuid4().hex[:8]})"
        body = {"session_id": session_id, "message": message, "turn_id": f"{run_id}-{index}-{turn}"}
        started = time.perf_counter()
        try:
            response = await client.post("/v1/chat", json=body, headers={SESSION_HEADER: session_id})
        except httpx.HTTPError as error:
            report.errors[type(error).__name__] += 1
            continue
        elapsed = time.perf_counter() - started
        if response.status_code != 200:
            report.errors[_error_kind(response)] += 1
            continue
        data = response.json()
        report.latencies.append(elapsed)
        report.cache[data["history"]["cache"]] += 1
        report.replicas[data["served_by"]] += 1
        if previous is not None:
            report.follow_ups += 1
            if not saw_previous(data["reply"], int(data["history"]["messages"]), previous):
                report.recall_failures.append(
                    f"{session_id} turn {turn} on {data['served_by']}: given {data['history']['messages']} "
                    f"messages, replied {data['reply'][:100]!r}"
                )
        previous = message


async def _progress(report: LoadReport, total: int, out: TextIO, started: float) -> None:
    tty = out.isatty()
    while True:
        await asyncio.sleep(1.0)
        done = report.ok_turns + report.error_count
        rate = report.ok_turns / max(1e-9, time.perf_counter() - started)
        line = f"[loadgen] {done}/{total} turns, {report.error_count} errors, {rate:.1f} turns/s"
        out.write(("\r" + line) if tty else (line + "\n"))
        out.flush()


async def run_loadgen(
    url: str,
    *,
    sessions: int,
    turns: int,
    concurrency: int,
    api_key: str | None = None,
    request_timeout: float = 30.0,
    keepalive: bool = True,
    progress: TextIO | None = None,
) -> LoadReport:
    """Run ``sessions`` conversations of ``turns`` turns, ``concurrency`` at a time."""
    report = LoadReport(
        url=url, sessions=sessions, turns_per_session=turns, concurrency=concurrency, keepalive=keepalive
    )
    run_id = uuid.uuid4().hex[:8]
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency if keepalive else 0)
    pending: asyncio.Queue[int] = asyncio.Queue()
    for index in range(sessions):
        pending.put_nowait(index)

    async def worker(client: httpx.AsyncClient) -> None:
        while True:
            try:
                index = pending.get_nowait()
            except asyncio.QueueEmpty:
                return
            await _conversation(client, report, run_id, index, turns)

    started = time.perf_counter()
    ticker = asyncio.create_task(_progress(report, sessions * turns, progress, started)) if progress else None
    try:
        async with httpx.AsyncClient(base_url=url, headers=headers, timeout=request_timeout, limits=limits) as client:
            await asyncio.gather(*(worker(client) for _ in range(max(1, min(concurrency, sessions)))))
    finally:
        report.seconds = time.perf_counter() - started
        if ticker is not None:
            ticker.cancel()
            if progress is not None and progress.isatty():
                progress.write("\n")
    return report


def main(
    url: str,
    sessions: int,
    turns: int,
    concurrency: int,
    api_key: str | None = None,
    *,
    as_json: bool = False,
    keepalive: bool = True,
    timeout: float = 30.0,
) -> int:
    """Run and print the report (text, or one JSON object); exit status 0 only when it passed."""
    report = asyncio.run(
        run_loadgen(
            url.rstrip("/"),
            sessions=sessions,
            turns=turns,
            concurrency=concurrency,
            api_key=api_key,
            request_timeout=timeout,
            keepalive=keepalive,
            progress=sys.stderr,
        )
    )
    print(json.dumps(report.summary()) if as_json else report.format(), flush=True)
    return 0 if report.passed else 1
