"""Prometheus metrics of the chat service (reference: docs/service.md).

Every name starts with ``engram_``; labels take values from small fixed sets only (cache outcome, turn
outcome, route template, method, status code, Redis operation, quota) - never a session or path. The one
exception is the tenant usage gauges' ``tenant`` label: tenants are created by administrators (operator,
``engram tenant``), never by clients, and a process reports at most ``USAGE_TENANTS_REPORTED`` of them
(the first it sees), so the series stay bounded.

Several workers in one replica: ``engram serve`` points ``PROMETHEUS_MULTIPROC_DIR`` at an empty folder
before any worker imports prometheus_client, each worker writes its samples there, and ``/metrics``
sums them with a ``MultiProcessCollector``. Without the variable (one process, e.g. under plain
uvicorn) the default in-memory registry is served. The only gauges are the tenant usage ones, in
``mostrecent`` mode: a value every commit reports about the tenant (not about the process), so the newest
sample of any worker, live or dead, is the right one (uvicorn never calls ``mark_process_dead``).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    REGISTRY,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    multiprocess,
    values,
)

from engram.errors import StoreUnavailable
from engram.messages import CacheOutcome, Usage, Window

MULTIPROCESS_ENV = "PROMETHEUS_MULTIPROC_DIR"
# Chosen by prometheus_client when it was first imported: what /metrics must read.
MULTIPROCESS = values.ValueClass is not values.MutexValue

CACHE_OUTCOMES: tuple[CacheOutcome, ...] = ("hit", "delta", "miss")
TURN_OUTCOMES = (
    "ok", "replayed", "duplicate", "model_error", "rejected", "abandoned",
    # a store error's code (see engram.errors)
    "store_unavailable", "store_read_only", "store_full", "outcome_unknown",
    "not_replicated",
    # over a quota or the request rate (nothing stored)
    "rate_limited", "session_quota_exceeded", "storage_quota_exceeded",
)  # fmt: skip
QUOTA_REASONS = ("rate_limited", "session_quota_exceeded", "storage_quota_exceeded")
USAGE_TENANTS_REPORTED = 200
MODEL_OUTCOMES = ("ok", "error")
REDIS_OPERATIONS = ("load", "commit", "sessions", "messages", "delete", "auth", "ready", "summary", "export", "erase")
# A background summary advance (engram.server.summaries): what it did, or why it did not run.
SUMMARY_OUTCOMES = ("advanced", "nothing", "conflict", "gone", "error", "skipped")
TURN_STEPS = ("load", "model", "commit")

# Fast paths are sub-millisecond (a cached Redis load); model calls take seconds.
FAST_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
SLOW_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
# Steps of a turn: Redis round trips (sub-millisecond) and the model (seconds) in one histogram.
STEP_BUCKETS = (*FAST_BUCKETS[:-2], *SLOW_BUCKETS[SLOW_BUCKETS.index(1.0) :])

HISTORY_LOADS = Counter(
    "engram_history_loads_total",
    "History window loads by cache outcome (hit: cached tail current, delta: only new messages read, "
    "miss: window read from Redis).",
    ["outcome"],
)
HISTORY_LOAD_SECONDS = Histogram(
    "engram_history_load_duration_seconds",
    "Time to load a session's history window (one Redis round trip).",
    ["outcome"],
    buckets=FAST_BUCKETS,
)
HISTORY_MESSAGES = Counter(
    "engram_history_loaded_messages_total", "Messages in the history windows handed to the model."
)
HISTORY_BYTES = Counter(
    "engram_history_loaded_bytes_total", "UTF-8 bytes of message content in the history windows loaded."
)
TURNS = Counter("engram_turns_total", "Chat turns by outcome.", ["outcome"])
TURN_SECONDS = Histogram(
    "engram_turn_duration_seconds",
    "Time of a whole chat turn (load, model, commit) by outcome.",
    ["outcome"],
    buckets=SLOW_BUCKETS,
)
STEP_SECONDS = Histogram(
    "engram_turn_step_duration_seconds",
    "Time of each step of a chat turn: load (Redis round trip 1), model (request to last piece), "
    "commit (Redis round trip 2).",
    ["step"],
    buckets=STEP_BUCKETS,
)
MODEL_SECONDS = Histogram(
    "engram_model_duration_seconds",
    "Time the model took to answer (to the last token when streaming).",
    ["outcome"],
    buckets=SLOW_BUCKETS,
)
REDIS_COMMITS = Counter(
    "engram_redis_commits_total",
    "Turns committed, by the Redis node (host:port) that was the primary (with Sentinel: changes at a failover).",
    ["node"],
)
REDIS_ERRORS = Counter(
    "engram_redis_errors_total", "Redis calls that failed (unreachable or timed out) by operation.", ["operation"]
)
QUOTA_REJECTIONS = Counter(
    "engram_quota_rejections_total",
    "Requests refused for a tenant's quota: rate_limited (429), session_quota_exceeded or storage_quota_exceeded.",
    ["reason"],
)
TENANT_STORED_BYTES = Gauge(
    "engram_tenant_stored_bytes",
    "Bytes of messages a tenant stores, as its maxStoredBytes quota counts them (reported by each commit).",
    ["tenant"],
    multiprocess_mode="mostrecent",
)
TENANT_SESSIONS = Gauge(
    "engram_tenant_sessions",
    "Live sessions of a tenant, as its maxSessions quota counts them (reported by each commit).",
    ["tenant"],
    multiprocess_mode="mostrecent",
)
_usage_tenants: set[str] = set()
HTTP_REQUESTS = Counter(
    "engram_http_requests_total", "HTTP requests by route template, method and status.", ["route", "method", "status"]
)
HTTP_SECONDS = Histogram(
    "engram_http_request_duration_seconds",
    "HTTP request time by route template and method (to the last byte when streaming).",
    ["route", "method"],
    buckets=SLOW_BUCKETS,
)


SUMMARY_RUNS = Counter(
    "engram_summary_runs_total", "Background rolling-summary advances by outcome (ENGRAM_MEMORY=summary).", ["outcome"]
)
SUMMARY_MESSAGES = Counter("engram_summary_messages_total", "Messages folded into rolling summaries.")
SUMMARY_SECONDS = Histogram(
    "engram_summary_seconds", "Duration of a background summary advance (model calls included).", buckets=SLOW_BUCKETS
)


def initialise() -> None:
    """Create every bounded label set at zero, so dashboards and rate() see the series from the start."""
    for cache in CACHE_OUTCOMES:
        HISTORY_LOADS.labels(cache)
        HISTORY_LOAD_SECONDS.labels(cache)
    for turn in TURN_OUTCOMES:
        TURNS.labels(turn)
        TURN_SECONDS.labels(turn)
    for model in MODEL_OUTCOMES:
        MODEL_SECONDS.labels(model)
    for step_name in TURN_STEPS:
        STEP_SECONDS.labels(step_name)
    for operation in REDIS_OPERATIONS:
        REDIS_ERRORS.labels(operation)
    for reason in QUOTA_REASONS:
        QUOTA_REJECTIONS.labels(reason)
    for summary in SUMMARY_OUTCOMES:
        SUMMARY_RUNS.labels(summary)


def render() -> tuple[bytes, str]:
    """The exposition text of this replica: all workers summed in multiprocess mode."""
    if MULTIPROCESS:
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
        return generate_latest(registry), CONTENT_TYPE_LATEST
    return generate_latest(REGISTRY), CONTENT_TYPE_LATEST


# --- recording ---------------------------------------------------------------------------------------
def observe_load(window: Window, seconds: float) -> None:
    STEP_SECONDS.labels("load").observe(seconds)
    if window.outcome == "off":  # ENGRAM_MEMORY=off: nothing was loaded
        return
    HISTORY_LOADS.labels(window.outcome).inc()
    HISTORY_LOAD_SECONDS.labels(window.outcome).observe(seconds)
    HISTORY_MESSAGES.inc(len(window.messages))
    HISTORY_BYTES.inc(sum(len(m.content.encode("utf-8")) for m in window.messages))


def observe_turn(outcome: str, seconds: float) -> None:
    TURNS.labels(outcome).inc()
    TURN_SECONDS.labels(outcome).observe(seconds)
    if outcome in QUOTA_REASONS:
        QUOTA_REJECTIONS.labels(outcome).inc()


def observe_commit_node(node: str) -> None:
    REDIS_COMMITS.labels(node).inc()


def observe_quota_rejection(reason: str) -> None:
    """A request that is not a turn refused for a quota (turns count theirs in :func:`observe_turn`)."""
    QUOTA_REJECTIONS.labels(reason).inc()


def observe_usage(tenant: str, usage: Usage) -> None:
    """The tenant's usage after a commit; at most USAGE_TENANTS_REPORTED tenants per process."""
    if tenant not in _usage_tenants:
        if len(_usage_tenants) >= USAGE_TENANTS_REPORTED:
            return
        _usage_tenants.add(tenant)
    TENANT_STORED_BYTES.labels(tenant).set(usage.stored_bytes)
    TENANT_SESSIONS.labels(tenant).set(usage.sessions)


def observe_http(route: str, method: str, status: int, seconds: float) -> None:
    HTTP_REQUESTS.labels(route, method, str(status)).inc()
    HTTP_SECONDS.labels(route, method).observe(seconds)


def observe_model(outcome: str, seconds: float) -> None:
    """The model's answer, from the request to its last piece (or its failure)."""
    STEP_SECONDS.labels("model").observe(seconds)
    MODEL_SECONDS.labels(outcome).observe(seconds)


def observe_summary(outcome: str, messages: int = 0, seconds: float | None = None) -> None:
    SUMMARY_RUNS.labels(outcome).inc()
    if messages:
        SUMMARY_MESSAGES.inc(messages)
    if seconds is not None:
        SUMMARY_SECONDS.observe(seconds)


@contextmanager
def step(name: str) -> Iterator[None]:
    """Time a step of a turn (whether it succeeds or fails)."""
    started = time.perf_counter()
    try:
        yield
    finally:
        STEP_SECONDS.labels(name).observe(time.perf_counter() - started)


@contextmanager
def redis_operation(operation: str) -> Iterator[None]:
    """Count a :class:`StoreUnavailable` raised inside the block under ``operation``, and re-raise it."""
    try:
        yield
    except StoreUnavailable:
        REDIS_ERRORS.labels(operation).inc()
        raise
