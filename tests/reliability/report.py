"""Rewrite the results table of docs/reliability.md from the figures the last runs recorded
(tests/artifacts/reliability/*.json): ``python -m tests.reliability.report`` (``make soak``, ``make chaos``
and ``make reliability`` run it after their scenarios).

Only the text between the two marker comments is replaced; a scenario that has not run yet says so.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tests.reliability.support import RESULTS
from tests.server.support import REPO

DOC = REPO / "docs" / "reliability.md"
START, END = "<!-- reliability-table:start -->", "<!-- reliability-table:end -->"
Figures = dict[str, Any]


def load(name: str) -> Figures | None:
    path = RESULTS / f"{name}.json"
    return json.loads(path.read_text()) if path.exists() else None


def _errors(errors: dict[str, int]) -> str:
    return ", ".join(f"{count}× {kind}" for kind, count in sorted(errors.items())) or "none"


def _mib(per_pid: dict[str, float]) -> str:
    return " / ".join(str(value) for value in per_pid.values())


Row = tuple[str, str, Callable[[Figures], tuple[str, str, str, str, str]]]

ROWS: list[Row] = [
    (
        "Service killed",
        "replica_killed",
        lambda f: (
            f"{f['sessions']} sessions × {f['turns_per_session']} turns, concurrency {f['concurrency']}, "
            f"{f['replicas']} replicas via HAProxy, model 50 ms",
            f"SIGKILL of replica 1 after {f['killed_after_turns']} turns; clients retry the same turn_id "
            f"({f['turns_retried']} retries: {_errors(f['retry_errors'])})",
            "—",
            str(f["lost"]),
            f"{f['turns_stored']} stored, {f['duplicated']} duplicated, {f['interleaved']} interleaved, "
            f"{f['out_of_order']} out of order; {f['replayed_on_retry']} retries answered from Redis (replayed)",
        ),
    ),
    (
        "Service killed after its commit",
        "replica_killed_after_commit",
        lambda f: (
            "one turn through a forwarder to replica A of 2",
            "SIGKILL of replica A when its answer starts (after the commit); the answer is dropped",
            "—",
            str(f["lost"]),
            f"the retry on replica B is answered from Redis ({f['replayed']} replayed); model called "
            f"{f['model_requests']}×, turn stored {f['turns_stored']}×",
        ),
    ),
    (
        "Redis killed (`appendfsync always`)",
        "redis_killed_always",
        lambda f: (
            f"{f['sessions']} sessions × {f['turns_per_session']} turns, concurrency {f['concurrency']}, "
            f"{f['replicas']} replicas via HAProxy",
            f"SIGKILL of redis-server after {f['acknowledged_before_kill']} acknowledged turns, restarted "
            f"{f['outage_seconds']} s later on the same AOF",
            "—",
            str(f["lost"]),
            f"{f['turns_acknowledged']} acknowledged, {f['turns_stored']} stored, {f['duplicated']} duplicated",
        ),
    ),
    (
        "Redis down",
        "redis_killed_always",
        lambda f: (
            "the same run",
            f"Redis unreachable for {f['outage_seconds']} s",
            "—",
            str(f["lost"]),
            f"{f['responses_503']} JSON 503s, slowest {f['slowest_503_seconds']} s; /readyz during the outage "
            f"{f['readyz_during_outage']}; ready {f['seconds_to_ready']} s and first turn "
            f"{f['seconds_to_first_turn']} s after Redis answered; {f['interleaved']} half-written turns",
        ),
    ),
    (
        "Redis killed (`appendfsync everysec`)",
        "redis_killed_everysec",
        lambda f: (
            f"{f['sessions']} sessions × {f['turns_per_session']} turns, concurrency {f['concurrency']}, 3 replicas",
            f"SIGKILL of redis-server after {f['acknowledged_before_kill']} acknowledged turns, restarted",
            "—",
            str(f["lost"]),
            f"measured loss window {f['loss_window_seconds']} s (a process crash; see below for a machine crash)",
        ),
    ),
    (
        "Model timeout",
        "model_timeout",
        lambda f: (
            "one turn JSON, one streamed",
            f"a model server that accepts and never answers; ENGRAM_LLM_TIMEOUT={f['llm_timeout']} s",
            "—",
            "0 (nothing was to be stored)",
            f"502 model_failed in at most {f['seconds_to_502_max']} s ({f['model_attempts']} model requests for "
            f"{f['requests']} turns: the client retries once); "
            f"{f['turns_stored']} turns stored",
        ),
    ),
    (
        "Client leaves mid-stream",
        "stream_disconnect",
        lambda f: (
            f"one streamed turn of {f['pieces']} pieces, {f['piece_delay']} s apart",
            "the client closes the connection after the first token",
            "—",
            "0 (nothing was acknowledged)",
            f"{f['stored_after_leaving']} messages stored after leaving (no half turn); a retry with the same "
            f"turn_id stored it {f['turns_stored_after_retry']}×",
        ),
    ),
    (
        "Concurrency (make test)",
        "concurrency-fast",
        lambda f: _concurrency(f),
    ),
    (
        "Concurrency (make chaos)",
        "concurrency",
        lambda f: _concurrency(f),
    ),
    (
        "One session, concurrent turns",
        "same_session",
        lambda f: (
            f"{f['concurrent_turns']} turns of one session at once × {f['rounds']} rounds, 3 replicas, "
            f"then all {f['retried_concurrently']} first turns retried at once",
            "—",
            "—",
            str(f["lost"]),
            f"{f['turns_stored']} stored, {f['duplicated']} duplicated, {f['interleaved']} pairs not adjacent",
        ),
    ),
    (
        "Bad input",
        "bad_input",
        lambda f: (
            "one replica, auth disabled",
            "—",
            f"{f['schemathesis_cases']} schemathesis cases (valid and invalid, from /openapi.json), "
            f"{f['messages']} messages and {f['session_ids']} session ids from hypothesis",
            "0",
            f"statuses {_errors(f['statuses'])}; {f['server_errors']} 5xx",
        ),
    ),
    (
        "Redis full (maxmemory, noeviction)",
        "store_full",
        lambda f: (
            "one replica, a session with one turn",
            "maxmemory lowered under used memory",
            f"{f['turns']} turns (JSON, streamed), a delete, /readyz",
            "0",
            f"{f['status']} store_full, model called {f['model_calls']}×; /readyz {f['readyz']} (replicas stay in "
            "the Service, so reads and deletes still work); "
            f"delete {f['delete_status']} (frees space)",
        ),
    ),
    (
        "Redis read-only (a replica)",
        "store_read_only",
        lambda f: (
            "one replica",
            "REPLICAOF a dead primary, then back",
            "one turn, /readyz",
            "0",
            f"{f['status']} store_read_only + Retry-After, model called {f['model_calls']}×; /readyz {f['readyz']}",
        ),
    ),
    (
        "Redis frozen during a commit",
        "commit_outcome_unknown",
        lambda f: (
            "one turn without turn_id, model 1 s",
            "SIGSTOP of redis-server while the model runs, socket timeout 0.5 s, then SIGCONT",
            "—",
            "0",
            f"{f['status']} outcome_unknown with a server-made turn_id; the queued commit ran; "
            f"a retry with that turn_id: {f['messages_after_retry']} messages stored (never twice)",
        ),
    ),
    (
        "Burst on one replica",
        "burst_200_one_replica",
        lambda f: (
            "200 first turns at once, 1 replica, 16 Redis connections",
            "—",
            "—",
            "0",
            f"statuses {_errors(f['statuses'])}; p99 {f['p99_s']} s (excess calls wait for a connection)",
        ),
    ),
    (
        "Model error echoing the API key",
        "model_error_text",
        lambda f: (
            "one replica, a model server that answers 500 with the request headers",
            "—",
            f"{f['turns']} turns (JSON, streamed)",
            "0",
            f"{f['status']} model_failed naming type and upstream status; "
            f"key in answers {f['key_in_answers']}×, in the log {f['key_in_log']}×",
        ),
    ),
    (
        "A turn id reused for another message",
        "turn_id_reused",
        lambda f: (
            "one replica",
            "—",
            "the same turn_id with another message (JSON, streamed)",
            "0",
            f"{f['status']} turn_id_reused; {f['stored_messages']} messages stored (unchanged)",
        ),
    ),
    (
        "Slow request headers (slowloris)",
        "slow_request_headers",
        lambda f: (
            "HAProxy in front of one replica",
            "a client that sends half its request headers, then nothing",
            "—",
            "0",
            f"HAProxy answers {f['status']} and closes after {f['seconds']} s (timeout http-request 10s)",
        ),
    ),
    ("Soak 30 s (make test)", "soak_30s", lambda f: _soak(f)),
    ("Soak 10 min (make soak)", "soak_10min", lambda f: _soak(f)),
    (
        "Chaos (make chaos)",
        "chaos",
        lambda f: (
            f"{f['sessions']} sessions × {f['turns_per_session']} turns, concurrency {f['concurrency']}, "
            f"3 replicas via HAProxy, {f['seconds']} s",
            "; ".join(f["faults"]) + f" ({f['turns_retried']} retries: {_errors(f['retry_errors'])})",
            "—",
            str(f["lost"]),
            f"{f['turns_stored']} stored, {f['duplicated']} duplicated, {f['interleaved']} interleaved, "
            f"{f['out_of_order']} out of order",
        ),
    ),
]


def _concurrency(f: Figures) -> tuple[str, str, str, str, str]:
    return (
        f"{f['sessions']} sessions × {f['turns_per_session']} turns, concurrency {f['concurrency']}, "
        f"{f['replicas']} replicas via HAProxy round-robin",
        "—",
        "—",
        str(f["lost"]),
        f"{f['turns_stored']} stored, {f['duplicated']} duplicated, {f['interleaved']} interleaved; "
        f"{f['turns_per_second']} turns/s, p50 {f['p50_ms']} ms, p99 {f['p99_ms']} ms; per replica {f['per_replica']}",
    )


def _soak(f: Figures) -> tuple[str, str, str, str, str]:
    return (
        f"{f['seconds']:.0f} s, {f['client_workers']} clients over {f['sessions']} sessions, 3 replicas via HAProxy, "
        f"{f['turns_per_second']} turns/s ({f['turns']} turns)",
        "—",
        "—",
        str(f["lost"]),
        f"{f['errors']} errors; RSS growth after warm-up at most {f['rss_growth_percent_max']} % "
        f"({_mib(f['rss_baseline_mib'])} → {_mib(f['rss_final_mib'])} MiB per replica); "
        f"p50 {f['p50_first_third_ms']} → {f['p50_last_third_ms']} ms (first → last third), p99 {f['p99_ms']} ms",
    )


def table() -> str:
    lines = [
        "| Scenario | Load held | Faults injected | Inputs tried | Turns lost | Other figures | Run at |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for title, name, render in ROWS:
        figures = load(name)
        if figures is None:
            lines.append(f"| {title} | not run yet | | | | | |")
            continue
        cells = render(figures)
        lines.append(f"| {title} | " + " | ".join(cells) + f" | {figures.get('recorded_at', '')} |")
    return "\n".join(lines)


def main(doc: Path = DOC) -> int:
    text = doc.read_text()
    if START not in text or END not in text:
        print(f"{doc}: the markers {START} / {END} are missing", file=sys.stderr)
        return 1
    head, rest = text.split(START, 1)
    _, tail = rest.split(END, 1)
    doc.write_text(f"{head}{START}\n{table()}\n{END}{tail}")
    print(f"{doc}: table rewritten from {RESULTS}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
